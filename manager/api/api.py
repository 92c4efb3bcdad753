from ninja import NinjaAPI

api = NinjaAPI(title="oTree Lab Manager API", version="1", urls_namespace="api")
