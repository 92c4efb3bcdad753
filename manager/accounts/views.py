from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.views import PasswordResetConfirmView
from django.core.paginator import Paginator
from django.db.models import Q
from django.http import Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse, reverse_lazy
from django.views.decorators.http import require_POST

from manager.access import superuser_required
from manager.accounts import services
from manager.accounts.forms import ProfileForm, SSHKeyForm, TokenForm, UserCreateForm, UserEditForm
from manager.accounts.models import User
from manager.audit.models import AuditEvent
from manager.audit.services import record
from manager.throttle import refused_page

# --- invitation ---------------------------------------------------------------------


class InvitationAcceptView(PasswordResetConfirmView):
    """The link in the invitation e-mail: choose a password (Django's token checks)."""

    template_name = "accounts/invitation_accept.html"
    success_url = reverse_lazy("account_login")
    post_reset_login = False

    def get_user(self, uidb64):
        user = super().get_user(uidb64)
        return user if user is not None and user.is_active else None  # deactivated: the link is dead

    def form_valid(self, form):
        response = super().form_valid(form)
        user = form.user
        if user.must_change_password:
            user.must_change_password = False
            user.save(update_fields=["must_change_password"])
        record(user, "auth.password_set", user, f"{user.username} chose a password from the invitation", self.request)
        messages.success(self.request, f"Your password is set, {user.display_name}. Log in with the username {user.username}.")
        return response


# --- own settings -------------------------------------------------------------------


@login_required
def profile(request):
    form = ProfileForm(request.POST or None, initial={"name": request.user.name})
    if request.method == "POST" and form.is_valid():
        user = request.user
        form.run(services.update_user, user, user, username=user.username, email=user.email,
                 name=form.cleaned_data["name"], request=request)
        if form.is_valid():
            messages.success(request, "Profile saved.")
            return redirect("profile")
    mfa_on = request.user.authenticator_set.exists()
    return render(request, "accounts/profile.html", {"form": form, "mfa_on": mfa_on})


@login_required
def ssh_keys(request):
    form = SSHKeyForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        key = form.run(services.add_ssh_key, request.user, title=form.cleaned_data["title"],
                       key=form.cleaned_data["key"], request=request)
        if key is not None:
            messages.success(request, f"SSH key “{key.title}” added ({key.fingerprint}).")
            return redirect("ssh_keys")
        if "PRIVATE KEY" in request.POST.get("key", ""):
            form.data = form.data.copy()
            form.data["key"] = ""  # never echo a pasted private key back into the page
    return render(request, "accounts/ssh_keys.html", {"form": form, "keys": request.user.ssh_keys.all()})


@login_required
@require_POST
def ssh_key_delete(request, key_id):
    key = get_object_or_404(request.user.ssh_keys, pk=key_id)  # other people's keys: 404
    services.remove_ssh_key(request.user, key, request=request)
    messages.success(request, f"SSH key “{key.title}” removed.")
    return redirect("ssh_keys")


NEW_TOKEN_COOKIE = "lab_new_token"


@login_required
def tokens(request):
    form = TokenForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        created = form.run(services.create_token, request.user, name=form.cleaned_data["name"], request=request)
        if created is not None:
            # Post/redirect/get, so a reload cannot create a second token. The raw token
            # rides to the browser in a short-lived signed cookie (never stored on the
            # server) and is shown on the next page view only.
            response = redirect("tokens")
            response.set_signed_cookie(NEW_TOKEN_COOKIE, created[1], salt=NEW_TOKEN_COOKIE, max_age=120,
                                       path=reverse("tokens"), httponly=True, samesite="Strict",
                                       secure=request.is_secure())
            return response
    new_token = None
    if request.method == "GET":
        new_token = request.get_signed_cookie(NEW_TOKEN_COOKIE, default=None, salt=NEW_TOKEN_COOKIE, max_age=120)
    response = render(request, "accounts/tokens.html", {
        "form": form, "tokens": request.user.access_tokens.all(), "new_token": new_token,
    })
    response.delete_cookie(NEW_TOKEN_COOKIE, path=reverse("tokens"))
    return refused_page(response, form.throttled) if form.throttled else response


@login_required
@require_POST
def token_revoke(request, token_id):
    token = get_object_or_404(request.user.access_tokens, pk=token_id)
    services.revoke_token(request.user, token, request=request)
    messages.success(request, f"Token “{token.name}” revoked: it no longer works.")
    return redirect("tokens")


# --- lab managers: accounts ---------------------------------------------------------


@superuser_required
def user_list(request):
    q = request.GET.get("q", "").strip()
    users = User.objects.all()
    if q:
        users = users.filter(Q(username__icontains=q) | Q(name__icontains=q) | Q(email__icontains=q))
    show = request.GET.get("show", "all")
    if show == "managers":
        users = users.filter(is_superuser=True)
    elif show == "inactive":
        users = users.filter(is_active=False)
    page = Paginator(users.order_by("username"), 50).get_page(request.GET.get("page"))
    return render(request, "users/list.html", {"page": page, "q": q, "show": show})


@superuser_required
def user_create(request):
    form = UserCreateForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.run(services.create_user, request.user, request=request, **form.cleaned_data)
        if user is not None:
            messages.success(request, f"Account {user.username} created. An invitation e-mail to {user.email} "
                                      "is on its way; you will be notified when it is sent.")
            return redirect("user_detail", user_id=user.pk)
    return render(request, "users/create.html", {"form": form})


@superuser_required
def user_detail(request, user_id):
    account = get_object_or_404(User, pk=user_id)
    form = UserEditForm(request.POST or None, initial={"name": account.name, "username": account.username,
                                                       "email": account.email,
                                                       "bot_monthly_budget_usd": account.bot_monthly_budget_usd})
    if request.method == "POST" and form.is_valid():
        form.run(services.update_user, request.user, account, request=request, **form.cleaned_data)
        if form.is_valid():
            messages.success(request, f"Account {account.username} saved.")
            return redirect("user_detail", user_id=account.pk)
    events = AuditEvent.objects.filter(Q(target_type="user", target_id=str(account.pk)) | Q(actor=account))[:20]
    return render(request, "users/detail.html", {
        "account": account, "form": form, "events": events,
        "keys": account.ssh_keys.all(), "tokens": account.access_tokens.all(),
        "mfa_on": account.authenticator_set.exists(),
    })


USER_ACTIONS = {
    "promote": (lambda actor, u, r: services.set_superuser(actor, u, True, r), "{u} is now a lab manager."),
    "demote": (lambda actor, u, r: services.set_superuser(actor, u, False, r), "{u} is now an experimenter."),
    "deactivate": (lambda actor, u, r: services.set_active(actor, u, False, r), "{u} is deactivated and logged out."),
    "activate": (lambda actor, u, r: services.set_active(actor, u, True, r), "{u} is active again."),
    "invite": (lambda actor, u, r: services.send_invitation(actor, u), "A new invitation e-mail to {u} is on its way."),
    "delete": (lambda actor, u, r: services.delete_user(actor, u, r), "Account {u} deleted."),
}


@superuser_required
def user_action(request, user_id, action):
    if action not in USER_ACTIONS:
        raise Http404("No such action")
    account = get_object_or_404(User, pk=user_id)
    if request.method != "POST":
        if action == "delete":  # the confirmation page
            return render(request, "users/confirm_delete.html", {"account": account})
        return redirect("user_detail", user_id=account.pk)
    fn, done = USER_ACTIONS[action]
    try:
        fn(request.user, account, request)
    except services.NotAllowed as exc:
        messages.error(request, str(exc))
        return redirect("user_detail", user_id=account.pk)
    messages.success(request, done.format(u=account.username))
    return redirect(reverse("user_list") if action == "delete" else reverse("user_detail", args=[account.pk]))
