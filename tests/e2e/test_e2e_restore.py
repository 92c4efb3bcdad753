"""Restore as a lab manager does it in a real browser: the real labserver (web, worker,
Redis) on Docker, an instance made on its page, *Back up now*, then the backup's *Restore*
button, the confirmation page (what will happen), the restore job run by the worker (a
fresh backup first); an upload of a file that is no backup is refused on the page with the
reason. (The data themselves are compared byte for byte in tests/instances/test_restore.py.)"""

import re
import sqlite3

import pytest
from django.conf import settings

from tests.conftest import CHROMIUM, need
from tests.docker_helpers import engine_ok, images_present
from tests.e2e.test_e2e_notifications import TIMEOUT_MS, _log_in, headless_chromium
from tests.labserver_helpers import (LabServer, first_superuser, free_port, migrate, new_data_dir, remove_data_dir,
                                     remove_instances)
from tests.waits import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.docker]


@pytest.fixture(scope="module")
def lab():
    need(CHROMIUM.exists(), f"chromium ({CHROMIUM})")
    need(engine_ok() and images_present(settings.LAB_IMAGE_POSTGRES, settings.LAB_IMAGE_REDIS),
         "a Docker engine with the images (python manage.py build_images)")
    data_dir = new_data_dir()
    port = free_port()
    migrate(data_dir, port)
    server = LabServer(data_dir, port, LAB_RUNTIME="docker")
    try:
        credentials = first_superuser(server)
        server.wait_ready()
        yield server, credentials, data_dir
    finally:
        remove_instances(data_dir, port, LAB_RUNTIME="docker")
        server.kill_everything()
        remove_data_dir(data_dir)


def query(data_dir, sql, *args):
    with sqlite3.connect(data_dir / "manager.sqlite3", timeout=20) as db:
        return db.execute(sql, args).fetchall()


def test_restore_from_the_instance_page(lab):
    from playwright.sync_api import expect

    server, (admin, one_time_password), data_dir = lab
    base = server.url
    with headless_chromium() as browser:
        context = browser.new_context()
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        _log_in(page, base, admin, one_time_password)
        page.wait_for_url(re.compile(r"/accounts/password/change/\?first=1$"))
        password = "Lab-manager-restore-2024!"
        page.fill("input[name=oldpassword]", one_time_password)
        page.fill("input[name=password1]", password)
        page.fill("input[name=password2]", password)
        page.click("main form button[type=submit]")
        page.wait_for_url(base + "/")

        page.goto(base + "/instances/new/")
        page.fill("input[name=name]", "e2e-rst")
        page.select_option("select[name=owner]", index=1)
        page.click("main form button[type=submit]")
        page.wait_for_url(base + "/instances/e2e-rst/")
        wait_until(lambda: query(data_dir, "SELECT status FROM instances_instance WHERE name = 'e2e-rst'")
                   == [("ready_for_code",)], timeout=120, interval=0.5, message="the instance's database runs",
                   ignore=(sqlite3.OperationalError,))

        page.get_by_role("button", name="Back up now").click()
        wait_until(lambda: query(data_dir, "SELECT status FROM instances_backup WHERE kind = 'manual'") == [("done",)],
                   timeout=60, interval=0.5, message="the backup is written",
                   ignore=(sqlite3.OperationalError,))
        page.goto(base + "/instances/e2e-rst/")
        page.locator("#backups a", has_text="Restore").first.click()
        expect(page.locator("h1")).to_contain_text("Restore e2e-rst-")
        explained = page.locator("#restore-explained")
        expect(explained).to_contain_text("fresh backup")
        expect(explained).to_contain_text("replaced")
        expect(explained).to_contain_text("restarts")
        page.click("#restore-confirm")
        page.wait_for_url(base + "/instances/e2e-rst/")
        expect(page.locator("main")).to_contain_text("a fresh backup of its data first")

        def restored():
            rows = query(data_dir, "SELECT status, message FROM jobs_job WHERE kind = 'instance.restore'")
            return rows if rows and rows[0][0] in ("succeeded", "failed") else None

        [(status, message)] = wait_until(restored, timeout=120, interval=0.5,
                                             message="the restore job ends", ignore=(sqlite3.OperationalError,))
        assert status == "succeeded" and "restored" in message, message
        assert query(data_dir, "SELECT status FROM instances_backup WHERE kind = 'before_restore'") == [("done",)]

        # An upload that is no backup: the page again, with the reason; nothing kept.
        page.goto(base + "/instances/e2e-rst/")
        page.set_input_files("#backup-upload input[type=file]",
                             files=[{"name": "results.csv", "mimeType": "text/csv", "buffer": b"a,b\n1,2\n"}])
        page.locator("#backup-upload button[type=submit]").click()
        expect(page.locator("#backup-upload")).to_contain_text("neither a PostgreSQL dump")
        assert query(data_dir, "SELECT count(*) FROM instances_backup WHERE kind = 'upload'") == [(0,)]
        context.close()
