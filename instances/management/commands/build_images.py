"""`python manage.py build_images`: local postgres, redis and python images for labs
without access to a container registry (and for CI), and the registry image of the swarm
runtime. The logic is in instances/images/builder.py."""

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from instances.images import builder


class Command(BaseCommand):
    help = (
        "Build local equivalents of the official postgres, redis and python images from a "
        "Debian mirror (debootstrap + docker import + docker build), tagged with the names "
        "of LAB_IMAGE_POSTGRES, LAB_IMAGE_REDIS and LAB_IMAGE_PYTHON, and a container "
        "registry (Debian's docker-registry) for the swarm runtime, tagged LAB_IMAGE_REGISTRY, "
        "and the swarm nodes' firewall image (Debian's iptables), tagged LAB_IMAGE_NETGUARD. "
        "Images that exist already are skipped. Needs root, debootstrap and a Docker engine."
    )

    def add_arguments(self, parser):
        parser.add_argument("--mirror", default=builder.DEFAULT_MIRROR,
                            help="Debian mirror (default: %(default)s)")
        parser.add_argument("--suite", default=builder.DEFAULT_SUITE,
                            help="Debian suite (default: %(default)s)")
        parser.add_argument("--security-mirror", default=None, metavar="URL",
                            help="Debian security archive; default: "
                                 f"{builder.DEFAULT_SECURITY_MIRROR} with the default mirror, "
                                 "none with another mirror; 'none' for none")
        parser.add_argument("--ca-bundle", type=Path, metavar="PATH",
                            help="extra CA certificates (PEM) to trust, for networks that "
                                 "intercept TLS; kept in the images (pip, git, apt use them)")
        parser.add_argument("--only", nargs="+", action="extend", choices=builder.IMAGES, metavar="IMAGE",
                            help="build only these images (postgres, redis, python, registry, netguard)")
        parser.add_argument("--force", action="store_true",
                            help="rebuild even images that exist (the Debian base too)")

    def handle(self, *args, **options):
        def out(line: str) -> None:
            self.stdout.write(line)
            self.stdout.flush()

        opts = builder.BuildOptions(
            mirror=options["mirror"],
            suite=options["suite"],
            security_mirror=options["security_mirror"],
            ca_bundle=options["ca_bundle"],
            only=tuple(options["only"] or builder.IMAGES),
            force=options["force"],
        )
        try:
            builder.build_images(opts, out)
        except builder.BuildError as exc:
            raise CommandError(str(exc)) from None
