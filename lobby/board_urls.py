"""The experimenter's lobby board, under /instances/<name>/lobby/ (owner, lab managers)."""

from django.urls import path

from lobby import views

urlpatterns = [
    path("welcome/", views.welcome, name="lobby_welcome"),
    path("launchers.zip", views.launchers_zip, name="lobby_launchers"),
    path("rooms/<str:room>/", views.board_room, name="lobby_board_room"),
    path("rooms/<str:room>/gate/", views.gate, name="lobby_gate"),
    path("rooms/<str:room>/reset/", views.reset, name="lobby_reset"),
    path("rooms/<str:room>/bots/", views.fill_with_bots, name="lobby_bots"),
]
