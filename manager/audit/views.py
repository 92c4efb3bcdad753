from django.shortcuts import render

from manager.access import superuser_required


@superuser_required
def audit_log(request):
    return render(request, "audit/log.html", {})
