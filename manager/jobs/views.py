from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from manager.jobs.models import Job


@login_required
def recent_jobs(request):
    jobs = Job.objects.filter(user=request.user)[:10]
    return render(request, "jobs/_recent.html", {"jobs": jobs})
