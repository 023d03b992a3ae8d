# syntax=docker/dockerfile:1
# One image for every Ferry service; the service is chosen by the command:
#   docker run IMAGE service coordinator
#   docker run IMAGE service sensor --host host-a     (one host service, as deployed; also
#                                                      managed_object, migration_policy,
#                                                      hypervisor_adapter; `service host`: all four)
#   docker run IMAGE migrate vm-1 --to host-b
#   docker run IMAGE health                           (exit 0 when /readyz answers 200)
#
# Build args:
#   EXTRAS=otlp             pip extras of the project to install ("otlp,hypervisors" adds
#                           the qemu QMP driver).
#   WITH_LIBVIRT=false      "true" also builds libvirt-python against Debian's libvirt and
#                           installs the libvirt client library (the libvirt driver).
#
# The image runs as the unprivileged user "ferry" (uid/gid 10001). Only the hypervisor
# adapter may need more: the qemu and libvirt drivers must reach /dev/kvm, the QMP sockets
# or /var/run/libvirt/libvirt-sock on the node. Grant that per deployment (supplemental group
# of the kvm/libvirt gid, or runAsUser 0 in the adapter DaemonSet's overlay; see
# deploy/k8s/components/hypervisor-access/ and docs/operations.md), not in the image.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: wheels for the project and every dependency -------------------------------------
FROM ${PYTHON_IMAGE} AS build
ARG EXTRAS=otlp
ARG WITH_LIBVIRT=false
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN if [ "$WITH_LIBVIRT" = "true" ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends gcc libc6-dev libvirt-dev pkg-config \
      && rm -rf /var/lib/apt/lists/*; \
    fi
WORKDIR /src
COPY pyproject.toml ./
COPY apps/ apps/
COPY libs/ libs/
COPY services/ services/
COPY examples/ examples/
RUN pip wheel --wheel-dir /wheels ".[${EXTRAS}]" \
    && if [ "$WITH_LIBVIRT" = "true" ]; then pip wheel --wheel-dir /wheels "libvirt-python>=9.0"; fi

# ---- runtime ---------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG EXTRAS=otlp
ARG WITH_LIBVIRT=false
LABEL org.opencontainers.image.title="ferry" \
      org.opencontainers.image.description="Ferry: live-migrate VMs together with their management plane"
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FERRY_HEALTH_PORT=8080 \
    FERRY_STATE_DIR=/var/lib/ferry \
    FERRY_STORE_URL=sqlite:///data/ferry.db
RUN if [ "$WITH_LIBVIRT" = "true" ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends libvirt0 \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --system --gid 10001 ferry \
    && useradd --system --uid 10001 --gid ferry --home-dir /var/lib/ferry --shell /usr/sbin/nologin ferry \
    && mkdir -p /var/lib/ferry /data /etc/ferry/keys \
    && chown ferry:ferry /var/lib/ferry /data
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels "ferry[${EXTRAS}]" \
    && if [ "$WITH_LIBVIRT" = "true" ]; then pip install --no-index --find-links /wheels libvirt-python; fi \
    && ferry --help >/dev/null
USER 10001:10001
WORKDIR /var/lib/ferry
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 CMD ["ferry", "health"]
ENTRYPOINT ["ferry"]
CMD ["--help"]
