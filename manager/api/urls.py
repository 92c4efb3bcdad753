from django.urls import path

from manager.api.api import api

urlpatterns = [path("", api.urls)]
