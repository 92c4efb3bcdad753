"""The process runtime as it was before tenant isolation (commit fc5e3f5), kept verbatim so
test_runtime_process.py can make a real old-layout instance (a tenant-owned folder, the
supervisor running as the tenant) and prove the current runtime migrates it without losing
data. Never used by the product."""
