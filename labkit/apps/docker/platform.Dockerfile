# The course's training platform as a container image, for real clusters (the sandbox runs the module directly).
#
# Build from the repository root, one image per release, and push to the registry the class uses:
#   docker build -f labkit/apps/docker/platform.Dockerfile --build-arg VERSION=1.0 -t REGISTRY/labkit/platform:1.0 .
#   docker push REGISTRY/labkit/platform:1.0
# Releases 1.0 (correct) and 1.1 to 1.4 (each with a documented defect) are what the labs use.
# One image, four roles: the container's args pick one, e.g. `args: [worker]` (labkit/apps/manifests/platform.yaml).
FROM python:3.12-slim
ARG VERSION=1.0
ENV APP_VERSION=$VERSION PYTHONUNBUFFERED=1 PYTHONPATH=/app
WORKDIR /app
# Only the standard-library apps: an empty labkit/__init__.py keeps the rest of labkit out.
RUN mkdir -p labkit && touch labkit/__init__.py
COPY labkit/apps/__init__.py labkit/apps/web.py labkit/apps/
COPY labkit/apps/platform/ labkit/apps/platform/
USER 65534:65534
EXPOSE 8080
ENTRYPOINT ["python3", "-m", "labkit.apps.platform"]
