"""`python manage.py firewall [--show | --remove]`: the instances' firewall (instances.netguard).

Without options it applies this manager's rules (as labserver start and the minute
sweep do) and says whether they are in place. A manager that runs without root needs
this once per boot as root (e.g. the systemd unit's `ExecStartPre=+`).
"""

from django.core.management.base import BaseCommand, CommandError

from instances import netguard


class Command(BaseCommand):
    help = ("Apply this manager's firewall rules (instances and builds reach no service of this machine, no other "
            "instance and no link-local/metadata address; LAB_EGRESS for the outside) and report whether they hold.")

    def add_arguments(self, parser):
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--show", action="store_true", help="print the rules and whether they are in place")
        group.add_argument("--remove", action="store_true",
                           help="remove this manager's rules (uninstall); the instances are unprotected afterwards")

    def handle(self, *args, **options):
        policy = netguard.Policy.from_settings()
        if options["show"]:
            self.stdout.write(netguard.show(policy))
            state = netguard.status(policy)
            self.stdout.write(("in place: " if state.enforced else "") + state.detail + "\n")
            return
        if options["remove"]:
            try:
                removed = netguard.remove(policy)
            except netguard.NetguardError as exc:
                raise CommandError(str(exc)) from None
            self.stdout.write(f"removed the rules of manager {policy.manager_id}\n" if removed
                              else f"manager {policy.manager_id} had no rules here\n")
            return
        state = netguard.ensure(policy)
        if not state.enforced:
            raise CommandError(state.detail)
        self.stdout.write(("applied: " if state.changed else "already in place: ") + state.detail + "\n")
