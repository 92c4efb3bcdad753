"""Public kiosk pages, under /lobby/ (see manager/urls.py)."""

from django.urls import path

from lobby import views

urlpatterns = [
    path("<slug:instance>/", views.lobby_index, name="lobby_index"),
    path("<slug:instance>/<str:room>/", views.lobby_room, name="lobby_room"),
    # <path:...>: a participant label may contain "/" (sent as %2F, decoded before routing).
    path("<slug:instance>/<str:room>/<path:label>/", views.lobby_seat, name="lobby_seat"),
]
