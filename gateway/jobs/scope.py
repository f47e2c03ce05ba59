"""What a job's run adds to the ASGI scope it makes (``jobs/execution.py``).

A job keeps its owner's key name, never the key: its run names the owner in the scope and
admission (``pipeline/admission.py``) takes that key instead of one from the headers. Only the
job runner writes it; no header or client input can set a scope key.
"""

JOB_OWNER = "gateway.job_owner"
