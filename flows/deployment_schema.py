"""Deployments refuse parameters their flow does not take, before a run exists.

Prefect derives a deployment's parameter schema from the flow's signature but leaves it open: the server accepted
`{"foo": 1}`, created the run with every default, and only the run failed, minutes later, in the worker. Closing the
top-level object (`additionalProperties: false`; our pydantic configs already forbid unknown nested fields) makes
the server answer 409 naming the parameter. Run after `prefect deploy`: `python -m flows.deployment_schema`.
"""

from __future__ import annotations


def close_parameter_schemas() -> list[str]:
    """Close the parameter schema of every deployment on the server PREFECT_API_URL names; their names."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    closed = []
    with get_client(sync_client=True) as client:
        for deployment in client.read_deployments():
            schema = {**(deployment.parameter_openapi_schema or {}), "additionalProperties": False}
            client.update_deployment(deployment.id, DeploymentUpdate(parameter_openapi_schema=schema))
            closed.append(f"{deployment.flow_id}/{deployment.name}")
    return closed


if __name__ == "__main__":
    print(f"closed the parameter schemas of {len(close_parameter_schemas())} deployments")
