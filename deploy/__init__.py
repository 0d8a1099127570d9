"""Deployment files; `deploy.nginx.render` renders the nginx config (see deploy/README.md)."""
