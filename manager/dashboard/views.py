from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.db.models import Count, Q
from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from instances import services as instance_services
from instances.selectors import visible_instances, with_live_release
from manager.access import superuser_required
from manager.dashboard import nodes
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


@superuser_required
@require_POST
def node_drain(request, node_id):
    """Drain a swarm node: paused at once, its instances moved by a job (instances.services.drain_node)."""
    try:
        job = instance_services.drain_node(request.user, node_id, request=request)
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
    else:
        messages.info(request, f"{job.label}: no new instances go there; its instances move to other nodes one "
                               "after another (each briefly down). You are told when the job ends.")
    nodes.forget()
    return redirect("dashboard")


@superuser_required
@require_POST
def node_activate(request, node_id):
    try:
        node = instance_services.activate_node(request.user, node_id, request=request)
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
    else:
        messages.success(request, f"Node {node['hostname'] or node_id[:12]} is active: instances may be placed "
                                  "there again.")
    nodes.forget()
    return redirect("dashboard")
