from django.urls import path

from instances import views

urlpatterns = [
    path("new/", views.instance_create, name="instance_create"),
    path("<slug:name>/", views.instance_detail, name="instance_detail"),
    path("<slug:name>/settings/", views.instance_settings, name="instance_settings"),
    path("<slug:name>/admin-password/", views.instance_admin_password, name="instance_admin_password"),
    path("<slug:name>/admin-password/reveal/", views.instance_reveal_password, name="instance_reveal_password"),
    path("<slug:name>/limits/", views.instance_limits, name="instance_limits"),
    path("<slug:name>/backup-schedule/", views.instance_backup_schedule, name="instance_backup_schedule"),
    path("<slug:name>/sleep/", views.instance_sleep, name="instance_sleep"),
    path("<slug:name>/transfer/", views.instance_transfer, name="instance_transfer"),
    path("<slug:name>/move/", views.instance_move, name="instance_move"),
    path("<slug:name>/logs/", views.instance_logs, name="instance_logs"),
    path("<slug:name>/data.zip", views.instance_data, name="instance_data"),
    path("<slug:name>/backups/<int:backup_id>/download/", views.backup_download, name="backup_download"),
    path("<slug:name>/backups/<int:backup_id>/data.zip", views.backup_data_download, name="backup_data_download"),
    path("<slug:name>/backups/<int:backup_id>/restore/", views.instance_backup_restore, name="instance_backup_restore"),
    path("<slug:name>/backups/upload/", views.instance_backup_upload, name="instance_backup_upload"),
    path("<slug:name>/releases/<int:number>/", views.release_detail, name="release_detail"),
    path("<slug:name>/releases/<int:number>/rollback/", views.release_rollback, name="release_rollback"),
    path("<slug:name>/releases/<int:number>/switch/", views.release_switch, name="release_switch"),
    path("<slug:name>/<slug:action>/", views.instance_action, name="instance_action"),
]
