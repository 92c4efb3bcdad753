"""LAB_TLS=internal: the root certificate of Caddy's own CA, for the lab computers.

Public (no login): the lab computers fetch it before anyone logs in on them. 404 when
LAB_TLS is not internal or Caddy has not made its CA yet (it does on its first start).
"""

from __future__ import annotations

import hashlib

from django.conf import settings
from django.http import Http404, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from instances import proxy


def _root_pem() -> bytes:
    if settings.LAB_TLS != "internal":
        raise Http404("This manager does not use its own certificate authority.")
    try:
        return proxy.root_certificate_path().read_bytes()
    except OSError:
        raise Http404("The certificate authority does not exist yet: Caddy makes it on its first start.") from None


def fingerprint(pem: bytes) -> str:
    """SHA-256 of the certificate's DER form, as browsers and `openssl x509 -fingerprint -sha256` show it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


@require_GET
def ca_page(request):
    pem = _root_pem()
    return render(request, "dashboard/ca.html", {"fingerprint": fingerprint(pem)})


@require_GET
def ca_download(request):
    response = HttpResponse(_root_pem(), content_type="application/x-x509-ca-cert")
    response["Content-Disposition"] = 'attachment; filename="otree-lab-root.crt"'
    response["Cache-Control"] = "no-cache"
    return response
