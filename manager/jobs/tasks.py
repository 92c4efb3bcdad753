from celery import shared_task

from manager.jobs import services


@shared_task(name="manager.jobs.tasks.sweep_jobs", soft_time_limit=50, time_limit=60)
def sweep_jobs():
    return services.sweep()
