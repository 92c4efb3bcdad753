from django.conf import settings


def lab(request):
    return {"LAB_NAME": settings.LAB_NAME, "LAB_NAME_SET": settings.LAB_NAME_SET, "LAB_PUBLIC_URL": settings.LAB_PUBLIC_URL,
            "LAB_TLS": settings.LAB_TLS, "LAB_BACKUP_UPLOAD_MAX_MB": settings.LAB_BACKUP_UPLOAD_MAX_MB}
