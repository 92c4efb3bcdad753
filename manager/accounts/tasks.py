from django.conf import settings
from django.contrib.auth.tokens import default_token_generator
from django.core.mail import send_mail
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils.encoding import force_bytes
from django.utils.http import urlsafe_base64_encode

from manager.accounts.models import User
from manager.jobs.services import JobFailed, job_task


def invitation_link(user: User) -> str:
    # Made in the worker, never passed as a task argument: the token is a secret.
    uid = urlsafe_base64_encode(force_bytes(user.pk))
    token = default_token_generator.make_token(user)
    return settings.LAB_PUBLIC_URL + reverse("invitation_accept", args=[uid, token])


@job_task("accounts.send_invitation", time_limit=60)
def send_invitation(job, user_id):
    user = User.objects.filter(pk=user_id, is_active=True).first()
    if user is None:
        raise JobFailed("the account no longer exists or is deactivated")
    context = {
        "user": user,
        "link": invitation_link(user),
        "lab_name": settings.LAB_NAME,
        "invited_by": job.user.display_name if job.user else settings.LAB_NAME,
        "valid_days": settings.PASSWORD_RESET_TIMEOUT // 86400,
    }
    subject = render_to_string("accounts/email/invitation_subject.txt", context).strip()
    body = render_to_string("accounts/email/invitation.txt", context)
    try:
        send_mail(subject, body, None, [user.email])
    except OSError as exc:  # SMTP refused, DNS, timeouts
        raise JobFailed(f"could not send the e-mail to {user.email} ({exc})") from exc
    return f"Invitation e-mail sent to {user.username} <{user.email}>"
