"""The v1 endpoints, one module per concept of docs/http-api.md: actions, leases,
trajectories, pools, health. Each gives ``create_app`` an ``APIRouter`` whose handlers
find the app's ``Service`` on ``request.app.state``."""
