# The course's load generator as a container image, for real clusters (the sandbox runs the module directly).
#
# Build from the repository root and push to the registry the class uses:
#   docker build -f labkit/apps/docker/loadgen.Dockerfile --build-arg VERSION=1.0 -t REGISTRY/labkit/loadgen:1.0 .
#   docker push REGISTRY/labkit/loadgen:1.0
# Run it with the target as args, e.g. `args: [http://web/work?ms=20, --rate, "50", --duration, "60"]`.
FROM python:3.12-slim
ARG VERSION=1.0
ENV APP_VERSION=$VERSION PYTHONUNBUFFERED=1 PYTHONPATH=/app
WORKDIR /app
# Only the standard-library apps: an empty labkit/__init__.py keeps the rest of labkit out.
RUN mkdir -p labkit && touch labkit/__init__.py
COPY labkit/apps/__init__.py labkit/apps/loadgen.py labkit/apps/
USER 65534:65534
ENTRYPOINT ["python3", "-m", "labkit.apps.loadgen"]
