import uuid

from django.conf import settings
from django.db import models
from django.utils import timezone


class Job(models.Model):
    """One background task as the user sees it: what, who started it, how it ended."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    kind = models.CharField(max_length=64)
    label = models.CharField(max_length=200)  # "Send invitation to alice"
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs"
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True)
    message = models.TextField(blank=True)  # result or reason of failure, shown to the user
    link = models.CharField(max_length=300, blank=True)  # where the result can be seen
    time_limit = models.PositiveIntegerField(default=300)  # seconds; the sweep fails overdue jobs
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return f"{self.label} [{self.status}]"

    @property
    def is_finished(self):
        return self.status in {self.Status.SUCCEEDED, self.Status.FAILED}

    @property
    def duration(self):
        if self.started_at and self.finished_at:
            return self.finished_at - self.started_at
        return None
