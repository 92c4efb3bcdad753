from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import FileResponse, Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from instances import export, schedule, services, sessions, sleep
from instances.forms import (
    AdminPasswordForm, BackupScheduleForm, BackupUploadAnyForm, BackupUploadForm, InstanceCreateForm, LimitsForm, SleepForm,
    MoveForm, RestoreIntoForm, RestoreNewForm, SettingsForm, TransferForm,
)
from instances.models import Backup
from manager.accounts.forms import ServiceForm
from instances import runtime as runtimes
from instances.runtime.base import RuntimeError_
from instances.selectors import get_visible_backup, get_visible_instance, visible_instances
from manager.access import superuser_required
from manager.accounts.services import NotAllowed
from manager.throttle import Throttled, refused_page
from manager.audit.services import record
from manager.dashboard.nodes import swarm_nodes


@superuser_required
def instance_create(request):
    form = InstanceCreateForm(request.POST or None, initial={"owner": request.GET.get("owner")})
    if request.method == "POST" and form.is_valid():
        instance = form.run(services.create_instance, request.user, name=form.cleaned_data["name"],
                            owner=form.cleaned_data["owner"], request=request)
        if instance is not None:
            messages.success(request, f"Instance {instance.name} is being set up: database and Redis start now.")
            return redirect("instance_detail", name=instance.name)
    return render(request, "instances/create.html", {"form": form})


def _detail_context(instance, **forms):
    # The backend that runs it, as recorded by the reconciler: no engine call per page view.
    backend = runtimes.backend_class(instance.runtime)
    runtime = backend() if backend else None  # describes itself; no engine is contacted
    releases = list(instance.releases.select_related("pushed_by")[:10])
    live = instance.live_release
    context = {
        "instance": instance,
        "runtime": runtime,
        "database": runtime.database_label(instance.name) if runtime else "",
        "protections": runtime.protections(instance.name) if runtime and hasattr(runtime, "protections") else [],
        "releases": releases,
        "live": live,
        "backups": instance.backups.all()[:20],
        "otree_sessions": [sessions.public(s) for s in instance.otree_sessions or [] if isinstance(s, dict)],
        "live_minutes": sessions.live_minutes(),
        "settings_form": SettingsForm(initial={
            "auth_level": instance.auth_level, "production": instance.production,
            "env": "\n".join(f"{k}={v}" for k, v in sorted(instance.config_vars.items())),
        }),
        "password_form": AdminPasswordForm(),
        "limits_form": LimitsForm(initial={"memory_mb": instance.memory_mb, "cpus": instance.cpus}),
        "sleep_form": SleepForm(initial={"sleep_after_minutes": instance.sleep_after_minutes}),
        "sleep_after": sleep.sleep_after(instance),
        "transfer_form": TransferForm(initial={"owner": instance.owner_id}),
        "move_form": MoveForm(),
        "schedule_form": BackupScheduleForm(initial={field: getattr(instance, field) for field in schedule.FIELDS}),
        # its schedule, last backup and the overdue flag (as on the Backups page); lazily
        "backup_status": lambda: schedule.status_of(instance),
        "upload_form": BackupUploadForm(),
        # Asked only where the page shows the move form (lab managers, swarm instances).
        "move_targets": lambda: _move_targets(instance),
    }
    context.update(forms)
    return context


def _move_targets(instance) -> dict:
    """The nodes a swarm instance may move to: ready, active and not its own (the
    dashboard's cached list, a few seconds old), or why there are none."""
    swarm = swarm_nodes()
    if swarm is None:
        return {"nodes": [], "problem": "This lab has no swarm: the Docker engine here is no swarm manager."}
    if swarm["problem"]:
        return {"nodes": [], "problem": swarm["problem"]}
    return {"nodes": [n for n in swarm["nodes"] if n["ready"] and n["availability"] == "active"
                      and n["id"] != instance.node], "problem": ""}


def _forced(request) -> bool:
    """The confirmation page's "Do it anyway" sends force=1 with the original form."""
    return request.POST.get("force") == "1"


def _live_confirm(request, instance, exc):
    """A live oTree session refused the action: a confirmation naming the session(s) and the
    active participants, whose "Do it anyway" posts the same form again with force (409)."""
    fields = [(key, value) for key in request.POST if key not in ("csrfmiddlewaretoken", "force")
              for value in request.POST.getlist(key)]
    return render(request, "instances/live_confirm.html",
                  {"instance": instance, "refusal": exc, "fields": fields, "action_url": request.path}, status=409)


@login_required
def instance_detail(request, name):
    instance = get_visible_instance(request.user, name)
    return render(request, "instances/detail.html", _detail_context(instance))


def _form_post(request, instance, form, form_key, service, values, done):
    """A form of the detail page, posted: `service(request.user, instance, **values(cleaned
    data))`; on success the message `done` (formatted with the changed instance) and back to
    the page, else the page again with the form (as `form_key`) and its errors."""
    if form.is_valid() and form.run(service, request.user, instance, **values(form.cleaned_data),
                                    request=request, force=_forced(request)) is not None:
        messages.success(request, done.format(instance=instance))
        return redirect("instance_detail", name=instance.name)
    return _refused(request, instance, form, form_key)


def _refused(request, instance, form, form_key):
    """The page again with the form's errors: 422, or 429 with Retry-After when a rate limit
    refused it (nothing was done); a live oTree session asks for a confirmation (409)."""
    if form.confirm is not None:
        return _live_confirm(request, instance, form.confirm)
    page = render(request, "instances/detail.html", _detail_context(instance, **{form_key: form}), status=422)
    return refused_page(page, form.throttled) if form.throttled else page


@login_required
@require_POST
def instance_settings(request, name):
    instance = get_visible_instance(request.user, name)
    return _form_post(
        request, instance, SettingsForm(request.POST), "settings_form", services.update_settings,
        lambda data: {"auth_level": data["auth_level"], "production": data["production"], "env": data["env"]},
        "Settings saved; the app restarts with them once it answers with them (if it does not, the previous "
        "settings come back and you are told why). The database is untouched.",
    )


@login_required
@require_POST
def instance_admin_password(request, name):
    instance = get_visible_instance(request.user, name)
    form = AdminPasswordForm(request.POST)
    password = form.is_valid() and form.run(services.set_admin_password, request.user, instance,
                                            form.cleaned_data["password"] or None, request=request,
                                            force=_forced(request))
    if not password:
        return _refused(request, instance, form, "password_form")
    # Shown once, in this response only (never stored in a message or session).
    return render(request, "instances/detail.html", _detail_context(instance, new_admin_password=password))


@login_required
@require_POST
def instance_reveal_password(request, name):
    instance = get_visible_instance(request.user, name)
    record(request.user, "instance.reveal_password", instance, f"revealed the oTree admin password of {name}",
           request)
    return render(request, "instances/_password.html", {"instance": instance})


@superuser_required
@require_POST
def instance_limits(request, name):
    instance = get_visible_instance(request.user, name)
    return _form_post(
        request, instance, LimitsForm(request.POST), "limits_form", services.update_settings,
        lambda data: {"memory_mb": data["memory_mb"], "cpus": data["cpus"]},
        "Limits saved; the app restarts with them once it answers with them (if it does not, the previous "
        "limits come back).",
    )


def _no_force(service):
    """A service the session guard does not concern (it takes no `force`)."""
    def call(*args, force=False, **kwargs):
        return service(*args, **kwargs)
    return call


@superuser_required
@require_POST
def instance_backup_schedule(request, name):
    instance = get_visible_instance(request.user, name)
    return _form_post(
        request, instance, BackupScheduleForm(request.POST), "schedule_form", _no_force(schedule.update),
        lambda data: {field: data[field] for field in schedule.FIELDS},
        "Backup schedule of {instance.name} saved (nothing restarts).",
    )


@superuser_required
@require_POST
def instance_sleep(request, name):
    instance = get_visible_instance(request.user, name)
    return _form_post(
        request, instance, SleepForm(request.POST), "sleep_form", _no_force(sleep.set_sleep_after),
        lambda data: {"minutes": data["sleep_after_minutes"]},
        "Sleep setting of {instance.name} saved (nothing restarts).",
    )


@superuser_required
@require_POST
def instance_transfer(request, name):
    instance = get_visible_instance(request.user, name)
    return _form_post(
        request, instance, TransferForm(request.POST), "transfer_form", _no_force(services.transfer),
        lambda data: {"new_owner": data["owner"]},
        "{instance.name} now belongs to {instance.owner.username}.",
    )


@superuser_required
@require_POST
def instance_move(request, name):
    instance = get_visible_instance(request.user, name)
    return _form_post(
        request, instance, MoveForm(request.POST), "move_form", _no_force(services.move_instance),
        lambda data: {"node_id": data["node"]},
        "Moving {instance.name} to another node: it is down until its app runs there (usually 10–30 seconds); "
        "you are told when the job ends.",
    )


ACTIONS = {
    # action: (service, needs confirmation page, lab managers only, message); all but the
    # backup take `force` (the session guard)
    "restart": (services.restart, False, False, "Restarting {name}…"),
    "backup": (_no_force(services.backup_now), False, False, "Backing up {name}…"),
    "wake": (_no_force(services.wake_now), False, False, "Waking {name}…"),
    "reset-database": (services.reset_database, True, False,
                       "Backing up {name}, then emptying its database. You will be notified when it is done."),
    "delete": (services.delete_instance, True, True, "Deleting {name}; its final backup is kept."),
}


@login_required
def instance_action(request, name, action):
    if action not in ACTIONS:
        raise Http404("No such action")
    instance = get_visible_instance(request.user, name)
    service, confirm, managers_only, done = ACTIONS[action]
    if managers_only and not request.user.is_superuser:
        raise PermissionDenied("Only lab managers may do this.")
    if request.method != "POST":
        if confirm:
            return render(request, "instances/confirm.html", {"instance": instance, "action": action})
        return redirect("instance_detail", name=name)
    try:
        service(request.user, instance, request=request, force=_forced(request))
    except sessions.SessionLive as exc:
        return _live_confirm(request, instance, exc)
    except NotAllowed as exc:
        messages.error(request, str(exc))
        return redirect("instance_detail", name=name)
    except Throttled as exc:  # nothing was done: the page again, with why and when to retry
        messages.error(request, exc.detail)
        return refused_page(render(request, "instances/detail.html", _detail_context(instance)), exc)
    messages.info(request, done.format(name=name))
    return redirect("dashboard" if action == "delete" else "instance_detail", **({} if action == "delete" else {"name": name}))


@login_required
def instance_logs(request, name):
    instance = get_visible_instance(request.user, name)
    component = request.GET.get("component", "app")
    if component not in {"app", "db", "redis"}:
        raise Http404("No such component")
    try:
        text = runtimes.get_runtime(instance).logs(instance.name, component, tail=200)
    except RuntimeError_ as exc:
        text = f"(logs unavailable: {exc})"
    return render(request, "instances/_logs.html", {"instance": instance, "component": component, "text": text})


@login_required
def instance_data(request, name):
    """Download data: oTree's exports of the instance as one zip, made now (instances.export)."""
    instance = get_visible_instance(request.user, name)
    try:
        if instance.asleep:  # its app (and database) must answer the export
            sleep.wake_quietly(name, f"{request.user.username} downloaded its data", actor=request.user,
                               request=request)
        handle, filename = export.download(request.user, instance, request=request)
    except export.ExportFailed as exc:
        messages.error(request, f"Could not export the data of {name}: {exc}.")
        return redirect("instance_detail", name=name)
    except Throttled as exc:  # nothing was done: the page again, with why and when to retry
        messages.error(request, exc.detail)
        return refused_page(render(request, "instances/detail.html", _detail_context(instance)), exc)
    return send_data_zip(handle, filename)


def send_data_zip(handle, filename):
    """A data zip as a download that no cache keeps (participants' data)."""
    response = FileResponse(handle, as_attachment=True, filename=filename, content_type="application/zip")
    response["Cache-Control"] = "no-store"
    return response


@login_required
def backup_download(request, name, backup_id):
    instance = get_visible_instance(request.user, name)
    backup = get_object_or_404(instance.backups, pk=backup_id, status=Backup.Status.DONE)
    return _send_backup(request, backup, instance)


@login_required
def backup_data_download(request, name, backup_id):
    """The data export stored beside a backup (a reset's, a delete's)."""
    instance = get_visible_instance(request.user, name)
    backup = get_object_or_404(instance.backups, pk=backup_id, status=Backup.Status.DONE)
    return _send_backup_data(request, backup, instance)


def _send_backup_data(request, backup, audited):
    path = backup.data_path
    if path is None:
        raise Http404("This backup has no data export beside it.")
    if not path.exists():
        raise Http404("The data export is missing from LAB_DATA_DIR/backups.")
    record(request.user, "instance.backup_download", audited, f"downloaded the data export {backup.data_filename}",
           request)
    return send_data_zip(path.open("rb"), backup.data_filename)


def _send_backup(request, backup, audited):
    """The backup's file as a download, recorded in the audit log against `audited`."""
    if not backup.path.exists():
        raise Http404("The backup file is missing from LAB_DATA_DIR/backups.")
    record(request.user, "instance.backup_download", audited, f"downloaded backup {backup.filename}", request)
    return FileResponse(backup.path.open("rb"), as_attachment=True, filename=backup.filename,
                        content_type="application/octet-stream")


@login_required
def backup_list(request):
    """Per instance the user may see: its backup schedule, last finished backup (flagged
    when overdue or when the last scheduled try failed) and copies; then the backups —
    for lab managers every backup of the lab, including the final backups of deleted
    instances; for others those of their instances."""
    return render(request, "instances/backups.html", _backup_list_context(request))


def _backup_list_context(request, **extra) -> dict:
    backups = Backup.objects.select_related("instance", "owner", "created_by")
    if not request.user.is_superuser:
        backups = backups.filter(instance__in=visible_instances(request.user))
    return {"backups": backups[:500], "statuses": schedule.overview(request.user),
            "copy_dir": settings.LAB_BACKUP_COPY_DIR, "lab_schedule": schedule.lab_schedule(),
            "upload_form": BackupUploadAnyForm() if request.user.is_superuser else None, **extra}


@superuser_required
def backup_download_any(request, backup_id):
    backup = get_object_or_404(Backup, pk=backup_id, status=Backup.Status.DONE)
    return _send_backup(request, backup, backup)


@superuser_required
def backup_data_download_any(request, backup_id):
    backup = get_object_or_404(Backup, pk=backup_id, status=Backup.Status.DONE)
    return _send_backup_data(request, backup, backup)


# --- restoring and uploading backups ---------------------------------------------------------

@login_required
def instance_backup_restore(request, name, backup_id):
    """GET: what a restore of the backup into the instance does, and a button; POST: do it."""
    instance = get_visible_instance(request.user, name)
    backup = get_visible_backup(request.user, backup_id)
    form = ServiceForm(request.POST if request.method == "POST" else None)
    if request.method == "POST" and form.is_valid():
        job = form.run(services.restore_backup, request.user, instance, backup, request=request, force=_forced(request))
        if job is not None:
            messages.info(request, f"Restoring {backup.filename} into {instance.name}: a fresh backup of its data "
                                   "first, then the app restarts. You are told when the job ends.")
            return redirect("instance_detail", name=instance.name)
        if form.confirm is not None:  # a live oTree session: "Do it anyway" posts again with force
            return _live_confirm(request, instance, form.confirm)
        page = render(request, "instances/restore.html", {"instance": instance, "backup": backup, "form": form},
                      status=422)
        return refused_page(page, form.throttled) if form.throttled else page
    return render(request, "instances/restore.html", {"instance": instance, "backup": backup, "form": form})


@superuser_required
def backup_restore_any(request, backup_id):
    """The Backups page's restore: into an instance (chosen), or into a new one."""
    backup = get_visible_backup(request.user, backup_id)
    into = RestoreIntoForm(initial={"instance": backup.instance.name if backup.instance else None})
    new = RestoreNewForm(initial={"owner": backup.owner_id})
    if request.method == "POST":
        if request.POST.get("target") == "new":
            new = RestoreNewForm(request.POST)
            done = new.is_valid() and new.run(services.restore_into_new, request.user, backup,
                                              name=new.cleaned_data["name"], owner=new.cleaned_data["owner"],
                                              request=request)
            if done:
                messages.info(request, f"Creating {done[0].name} with the data of {backup.filename}; you are told "
                                       "when the job ends.")
                return redirect("instance_detail", name=done[0].name)
            form = new
        else:
            into = RestoreIntoForm(request.POST)
            done = into.is_valid() and into.run(services.restore_backup, request.user, into.cleaned_data["instance"],
                                                backup, request=request, force=_forced(request))
            if done:
                messages.info(request, f"Restoring {backup.filename} into {into.cleaned_data['instance'].name}: a "
                                       "fresh backup of its data first, then the app restarts.")
                return redirect("instance_detail", name=into.cleaned_data["instance"].name)
            if into.confirm is not None:
                return _live_confirm(request, into.cleaned_data["instance"], into.confirm)
            form = into
        page = render(request, "instances/restore.html", {"backup": backup, "into_form": into, "new_form": new},
                      status=422)
        return refused_page(page, form.throttled) if form.throttled else page
    return render(request, "instances/restore.html", {"backup": backup, "into_form": into, "new_form": new})


def _upload_refused(request, form, render_page):
    """413 with the limit's sentence when the file was over LAB_BACKUP_UPLOAD_MAX_MB (its
    rest was dropped as it arrived), else None."""
    refused = getattr(request, "upload_refused", "")
    if not refused:
        return None
    form.add_error("file", refused)
    return render_page(status=413)


@login_required
@require_POST
def instance_backup_upload(request, name):
    instance = get_visible_instance(request.user, name)
    form = BackupUploadForm(request.POST, request.FILES)

    def page(status):
        response = render(request, "instances/detail.html", _detail_context(instance, upload_form=form), status=status)
        return refused_page(response, form.throttled) if form.throttled else response

    refused = _upload_refused(request, form, page)
    if refused is not None:
        return refused
    row = form.is_valid() and form.run(services.upload_backup, request.user, instance, request.FILES.get("file"),
                                       request=request)
    _discard_files(request)
    if row:
        messages.success(request, f"Uploaded as {row.filename} ({row.size} bytes); restore it from the list of "
                                  "backups.")
        return redirect("instance_detail", name=instance.name)
    return page(422)


@superuser_required
def backup_upload_any(request):
    form = BackupUploadAnyForm(request.POST or None, request.FILES or None)

    def page(status=200):
        response = render(request, "instances/backups.html", _backup_list_context(request, upload_form=form),
                          status=status)
        return refused_page(response, form.throttled) if form.throttled else response

    if request.method != "POST":
        return redirect("backup_list")
    refused = _upload_refused(request, form, page)
    if refused is not None:
        return refused
    row = form.is_valid() and form.run(services.upload_backup, request.user, form.cleaned_data["instance"],
                                       request.FILES.get("file"), request=request)
    _discard_files(request)
    if row:
        messages.success(request, f"Uploaded as {row.filename} ({row.size} bytes) among the backups of "
                                  f"{row.instance_name}.")
        return redirect("backup_list")
    return page(422)


def _discard_files(request) -> None:
    """Uploaded files nobody kept (a form refused before the service ran) go."""
    for upload in request.FILES.values():
        if hasattr(upload, "discard"):
            upload.discard()


@login_required
def release_detail(request, name, number):
    instance = get_visible_instance(request.user, name)
    release = get_object_or_404(instance.releases.select_related("pushed_by", "rollback_of"), number=number)
    return render(request, "instances/release.html", {"instance": instance, "release": release})


@login_required
@require_POST
def release_rollback(request, name, number):
    from instances import releases

    instance = get_visible_instance(request.user, name)
    release = get_object_or_404(instance.releases, number=number)
    try:
        new = releases.rollback(request.user, release, force=_forced(request))
    except sessions.SessionLive as exc:
        return _live_confirm(request, instance, exc)
    except NotAllowed as exc:
        messages.error(request, str(exc))
        return redirect("release_detail", name=name, number=number)
    except ValidationError as exc:
        messages.error(request, "Cannot roll back: " + " ".join(exc.messages))
        return redirect("release_detail", name=name, number=number)
    messages.info(request, f"Rolling back to release #{release.number} ({release.commit[:8]}) as release #{new.number}.")
    return redirect("release_detail", name=name, number=new.number)


@login_required
@require_POST
def release_switch(request, name, number):
    """Switch now to a release that waits as ready to switch (live session or not)."""
    from instances import releases

    instance = get_visible_instance(request.user, name)
    release = get_object_or_404(instance.releases, number=number)
    try:
        releases.switch_now(request.user, release)
    except NotAllowed as exc:
        messages.error(request, str(exc))
    except ValidationError as exc:
        messages.error(request, "Cannot switch: " + " ".join(exc.messages))
    else:
        messages.info(request, f"Switching {name} to release #{number} now: its app starts, is health-checked and "
                               "then serves.")
    return redirect("release_detail", name=name, number=number)
