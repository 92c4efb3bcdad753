from django.contrib.auth.decorators import login_required
from django.db.models import Count, Q
from django.http import HttpResponse
from django.shortcuts import render

from instances.selectors import visible_instances, with_live_release
from manager.dashboard.nodes import swarm_nodes
from manager.accounts.models import User
from manager.jobs.models import Job


@login_required
def dashboard(request):
    user = request.user
    context = {
        "instances": with_live_release(visible_instances(user).order_by("name")),
        "jobs": Job.objects.filter(user=user)[:10],
        "has_key": user.ssh_keys.exists(),
        "has_token": user.access_tokens.exists(),
        "mfa_on": user.authenticator_set.exists(),
    }
    if user.is_superuser:
        context["stats"] = User.objects.filter(is_active=True).aggregate(
            accounts=Count("id"),
            managers=Count("id", filter=Q(is_superuser=True)),
            invited=Count("id", filter=Q(password__startswith="!")),
        )
        context["by_status"] = dict(visible_instances(user).order_by().values_list("status").annotate(n=Count("id")))
        context["swarm"] = swarm_nodes()  # None without a swarm; cached a few seconds
    return render(request, "dashboard/index.html", context)


def healthz(request):
    return HttpResponse("ok", content_type="text/plain")
