"""The API's routers, one per resource: the run and its rounds, the boards, the global model,
the metrics, the admin actions and the dashboard page. :func:`coordinator.api.create_app`
includes them all."""
