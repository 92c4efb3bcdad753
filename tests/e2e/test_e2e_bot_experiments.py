"""Bot experiments as an experimenter uses the pages: the real labserver (daphne, its
workers with the `bots` one, embedded Redis, beat), real headless Chromium. From the bot
runs page to *Bot experiments*, the design form (model checkboxes, temperatures, variants
one per line), a bad entry refused on its field, then the experiment's page following its
runs live to the end, and *Run again*.

The instance's rows are written into the labserver's database with a live release but no
running app (LAB_RUNTIME=process), so every run fails at once with the reason: the
scheduler, the worker and the page with its live topic are what is exercised here. Real play is in
tests/bots/test_bot_experiments.py.
"""

import pytest

from tests.conftest import CHROMIUM, need
from tests.e2e.test_e2e_lobby import shell
from tests.e2e.test_e2e_notifications import TIMEOUT_MS, headless_chromium
from tests.labserver_helpers import LabServer, free_port, migrate, new_data_dir, remove_data_dir, remove_instances

pytestmark = [pytest.mark.slow, pytest.mark.browser]

PASSWORD = "Experiment-e2e-password-2024"
ENV = {"LAB_RUNTIME": "process", "LAB_BOT_RUNS": "2"}


@pytest.fixture(scope="module")
def lab():
    need(CHROMIUM.exists(), f"chromium ({CHROMIUM})")
    data_dir, port = new_data_dir(), free_port()
    migrate(data_dir, port)
    shell(data_dir, port, f"""
from instances.models import Instance, Release
from manager.accounts.models import User
ann = User.objects.create_user("ann", "ann@lab.test", {PASSWORD!r}, name="Ann")
instance = Instance.objects.create(name="exp-e2e", owner=ann, status="stopped")
Release.objects.create(instance=instance, number=1, commit="a" * 40, status="live", language_code="en",
                       session_configs=[{{"name": "guess", "display_name": "Guess", "num_demo_participants": 3,
                                          "app_sequence": ["guess"]}}])
""")
    server = LabServer(data_dir, port, **ENV)
    try:
        server.wait_ready()
        yield server
    finally:
        server.kill_everything()
        remove_instances(data_dir, port, **ENV)
        remove_data_dir(data_dir)


def test_design_on_the_page_follow_it_live_and_run_it_again(lab):
    from playwright.sync_api import expect

    base = lab.url
    with headless_chromium() as browser:
        context = browser.new_context()
        context.set_default_timeout(TIMEOUT_MS)
        # Every live event a page receives (its socket's snapshot on subscribing, then the pushes).
        context.add_init_script("window.__events = []; document.addEventListener('lab:botexperiment', "
                                "function (e) { window.__events.push(e.detail); });")
        page = context.new_page()
        page.goto(base + "/accounts/login/")
        page.fill("input[name=login]", "ann")
        page.fill("input[name=password]", PASSWORD)
        page.click("main form button[type=submit]")
        page.wait_for_url(base + "/")

        page.goto(base + "/instances/exp-e2e/bot-runs/")
        page.get_by_role("link", name="Bot experiments").click()
        page.wait_for_url(base + "/instances/exp-e2e/bot-runs/experiments/")
        form = page.locator("#new-bot-experiment")
        form.locator("input[name=models][value=random]").check()
        form.locator("input[name=temperatures]").fill("0.2, hot")
        form.locator("textarea[name=instructions]").fill("plain:\nbold: Be bold.")
        form.locator("input[name=repetitions]").fill("1")
        form.locator("input[name=max_parallel]").fill("1")
        form.locator("input[name=num_bots]").fill("2")
        form.get_by_role("button", name="Start experiment").click()
        expect(page.locator("#new-bot-experiment")).to_contain_text("'hot' is not a number")  # on its field

        page.locator("#new-bot-experiment input[name=temperatures]").fill("0.2, 0.9")
        page.locator("#new-bot-experiment").get_by_role("button", name="Start experiment").click()
        page.wait_for_url(base + "/instances/exp-e2e/bot-runs/experiments/1/")
        rows = page.locator("tr[data-run]")
        expect(rows).to_have_count(4)  # 1 model x 2 temperatures x 2 variants
        expect(page.locator("tbody")).to_contain_text("bold")
        # The scheduler plays them one at a time; each fails (no app running); the page follows
        # to the end without being reloaded by hand.
        expect(page.locator("#experiment-reason")).to_have_text("0 of 4 runs finished, 4 failed",
                                                               timeout=90_000)
        expect(page.locator("#experiment-status")).to_have_text("failed")
        expect(page.locator('[data-p="failed"]')).to_have_text("4")
        expect(page.locator('[data-f="status"]', has_text="failed")).to_have_count(4)
        # The page's socket got the experiment's state (the topic let its owner in).
        page.wait_for_function("window.__events.some(e => e.status === 'failed' && e.progress.failed === 4 "
                               "&& e.runs.length === 4)")
        page.locator('tr[data-run] a').first.click()
        expect(page.locator("#run-status")).to_have_text("failed")  # its own page, with the reason

        page.goto(base + "/instances/exp-e2e/bot-runs/experiments/1/")
        page.get_by_role("button", name="Run again").click()
        page.wait_for_url(base + "/instances/exp-e2e/bot-runs/experiments/2/")
        expect(page.locator("main")).to_contain_text("repeats #1")
        expect(page.locator("tr[data-run]")).to_have_count(4)
        expect(page.locator("#experiment-reason")).to_have_text("0 of 4 runs finished, 4 failed",
                                                               timeout=90_000)
        context.close()
