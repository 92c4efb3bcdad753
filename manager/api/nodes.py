"""/api/v1/nodes: the swarm's nodes, for lab managers (superusers) only: list them, drain
one for maintenance (its instances move to other nodes), activate it again."""

from django.http import HttpRequest
from ninja import Router, Schema, Status
from pydantic import Field

from instances import services
from manager.api.auth import managers_only
from manager.api.errors import responses
from manager.api.instances import JobOut

router = Router(tags=["nodes"])


class NodeOut(Schema):
    id: str = Field(description="the swarm's node id (as `docker node ls` shows it)")
    hostname: str
    address: str = Field(description="the node's address in the swarm")
    state: str = Field(description="ready, down, unknown or disconnected: only a ready node takes instances")
    message: str = Field(description="the swarm's word on the state (e.g. why it is down); may be empty")
    availability: str = Field(description="active (takes instances), pause (no new ones; set while its instances "
                              "are moved off) or drain (none: drained for maintenance)",
                              json_schema_extra={"enum": ["active", "pause", "drain"]})
    role: str = Field(json_schema_extra={"enum": ["manager", "worker"]})
    memory_mb: int = Field(description="the node's memory, MiB")
    cpus: float
    reserved_mb: int = Field(description="memory the lab's services reserve there, MiB")
    instances: int = Field(description="instances of this lab on the node")
    local: bool = Field(description="the node this manager runs on")


@router.get("", summary="The swarm's nodes", response=responses({200: list[NodeOut]}, 403, 409),
            auth=managers_only("list the swarm's nodes"))
def list_nodes(request: HttpRequest):
    """Every node of the swarm this manager runs instances on; an empty list when this lab
    has no swarm (the Docker engine here is no swarm manager). 409 when the swarm does not
    list its nodes."""
    return services.list_nodes(request.auth)


@router.post("/{node_id}/drain", summary="Drain a node (its instances move to other nodes)",
             response=responses({202: JobOut}, 403, 404, 409), auth=managers_only("drain nodes"))
def drain_node(request: HttpRequest, node_id: str):
    """The node is paused at once (availability `pause`: no new instance goes there; those
    on it keep running), then a background job moves its instances to the emptiest other
    ready, active nodes, one after another: each is down for a short time while its
    database is backed up (kept among its backups), restored there and its app started;
    what oTree keeps in Redis is not moved. Once none is left the node is drained
    (availability `drain`), except the manager's own node, which stays paused (the lab's
    registry runs there). A node where some instances could not move stays paused (the job
    fails naming them). An unknown node is 404."""
    job = services.drain_node(request.auth, node_id, request=request)
    return Status(202, {"job": str(job.id), "detail": f"{job.label}: its instances move to other nodes"})


@router.post("/{node_id}/activate", summary="Activate a paused or drained node",
             response=responses({200: NodeOut}, 403, 404, 409), auth=managers_only("activate nodes"))
def activate_node(request: HttpRequest, node_id: str):
    """Availability `active`: new instances may be placed there again (none moves back by
    itself). An unknown node is 404."""
    return services.activate_node(request.auth, node_id, request=request)
