from django.urls import include, path
from django.views.generic import RedirectView

from bots import urls as bot_urls
from instances import views as instance_views
from manager.accounts import views as accounts
from manager.audit import views as audit
from manager.dashboard import tls as dashboard_tls
from manager.dashboard import views as dashboard
from manager.jobs import views as jobs

urlpatterns = [
    path("", dashboard.dashboard, name="dashboard"),
    path("healthz/", dashboard.healthz, name="healthz"),
    # LAB_TLS=internal: the CA's root certificate for the lab computers (public: no login)
    path("tls/", dashboard_tls.ca_page, name="tls_ca"),
    path("tls/root.crt", dashboard_tls.ca_download, name="tls_root_crt"),
    # accounts: allauth (login, logout, password change/reset, two-factor) + ours
    path("accounts/welcome/<uidb64>/<token>/", accounts.InvitationAcceptView.as_view(), name="invitation_accept"),
    # E-mail addresses are managed by lab managers (no unverified self-service changes).
    path("accounts/email/", RedirectView.as_view(pattern_name="profile"), name="account_email_redirect"),
    path("accounts/", include("allauth.urls")),
    path("settings/", accounts.profile, name="profile"),
    path("settings/keys/", accounts.ssh_keys, name="ssh_keys"),
    path("settings/keys/<int:key_id>/delete/", accounts.ssh_key_delete, name="ssh_key_delete"),
    path("settings/tokens/", accounts.tokens, name="tokens"),
    path("settings/tokens/<int:token_id>/revoke/", accounts.token_revoke, name="token_revoke"),
    # lab managers
    path("users/", accounts.user_list, name="user_list"),
    path("users/new/", accounts.user_create, name="user_create"),
    path("users/<int:user_id>/", accounts.user_detail, name="user_detail"),
    path("users/<int:user_id>/<str:action>/", accounts.user_action, name="user_action"),
    path("audit/", audit.audit_log, name="audit_log"),
    path("jobs/recent/", jobs.recent_jobs, name="recent_jobs"),
    path("nodes/<str:node_id>/drain/", dashboard.node_drain, name="node_drain"),
    path("nodes/<str:node_id>/activate/", dashboard.node_activate, name="node_activate"),
    # the lobby board (owner, lab managers): before instances.urls, whose <name>/<action>/ would take it
    path("instances/<slug:name>/lobby/", include("lobby.board_urls")),
    path("instances/<slug:name>/bot-runs/", include("bots.urls")),  # before the instances' catch-all
    path("bot-providers/", include(bot_urls.provider_urlpatterns)),
    path("instances/", include("instances.urls")),
    path("backups/", instance_views.backup_list, name="backup_list"),
    path("backups/<int:backup_id>/download/", instance_views.backup_download_any, name="backup_download_any"),
    path("backups/<int:backup_id>/data.zip", instance_views.backup_data_download_any,
         name="backup_data_download_any"),
    path("backups/<int:backup_id>/restore/", instance_views.backup_restore_any, name="backup_restore_any"),
    path("backups/upload/", instance_views.backup_upload_any, name="backup_upload_any"),
    path("api/v1/", include("manager.api.urls")),
    path("git/", include("instances.git.urls")),
    path("lobby/", include("lobby.urls")),  # public kiosk pages (lab computers have no login)
]
