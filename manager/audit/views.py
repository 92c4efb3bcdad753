from django.core.paginator import Paginator
from django.db.models import Q
from django.shortcuts import render

from manager.access import superuser_required
from manager.audit.models import AuditEvent


@superuser_required
def audit_log(request):
    events = AuditEvent.objects.all()
    user = request.GET.get("user", "").strip()
    action = request.GET.get("action", "").strip()
    q = request.GET.get("q", "").strip()
    if user:
        events = events.filter(Q(actor_name__iexact=user) | Q(target_type="user", target_repr__iexact=user))
    if action:
        events = events.filter(action__startswith=action)
    if q:
        events = events.filter(Q(summary__icontains=q) | Q(target_repr__icontains=q))
    page = Paginator(events, 100).get_page(request.GET.get("page"))
    actions = AuditEvent.objects.order_by().values_list("action", flat=True).distinct()
    prefixes = sorted({a.split(".")[0] for a in actions})
    return render(request, "audit/log.html", {
        "page": page, "user_filter": user, "action": action, "q": q, "prefixes": prefixes,
    })
