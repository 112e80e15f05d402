# The course's web app as a container image, for real clusters (the sandbox runs the module directly).
#
# Build from the repository root, one image per release, and push to the registry the class uses:
#   docker build -f labkit/apps/docker/web.Dockerfile --build-arg VERSION=2.0 -t REGISTRY/labkit/web:2.0 .
#   docker push REGISTRY/labkit/web:2.0
# Releases 1.0, 2.0 and 3.0 (the bad one, which never becomes ready) are what the labs use.
FROM python:3.12-slim
ARG VERSION=1.0
ENV APP_VERSION=$VERSION PYTHONUNBUFFERED=1 PYTHONPATH=/app
WORKDIR /app
# Only the standard-library apps: an empty labkit/__init__.py keeps the rest of labkit out.
RUN mkdir -p labkit && touch labkit/__init__.py
COPY labkit/apps/__init__.py labkit/apps/web.py labkit/apps/
USER 65534:65534
EXPOSE 8080
ENTRYPOINT ["python3", "-m", "labkit.apps.web"]
