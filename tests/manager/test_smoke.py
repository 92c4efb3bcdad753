import pytest
from django.core.cache import cache


def test_embedded_redis_backs_the_cache():
    cache.set("k", "v", 10)
    assert cache.get("k") == "v"


@pytest.mark.django_db
def test_login_page_renders(client):
    response = client.get("/accounts/login/")
    assert response.status_code == 200
