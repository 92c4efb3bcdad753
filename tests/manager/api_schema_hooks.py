"""Schemathesis hooks of tests/manager/test_api_schema.py (loaded from this file by the
schemathesis run): a rule the document states in words only, given to the generator.

`cpus` takes at most two decimals. The document says so in the field's description, not as
`multipleOf: 0.01`, which validators dividing in floating point misjudge (0.29 / 0.01 is
28.999…, so 0.29 would be refused); the server refuses 0.3333 with 422. Schema-valid bodies
are generated with cpus rounded to two decimals, as a client reading the description sends
them (tests/manager/test_api_schema.py checks the refusal itself)."""

import schemathesis


@schemathesis.hook
def map_body(context, body):
    operation = context.operation
    if operation is None or operation.method.upper() != "PATCH" or operation.path != "/api/v1/instances/{name}":
        return body
    cpus = body.get("cpus") if isinstance(body, dict) else None
    if isinstance(cpus, float) and 0.1 <= cpus <= 16:  # (out of range: a negative case, left as it is)
        return {**body, "cpus": round(cpus, 2)}
    return body
