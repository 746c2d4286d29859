# relay as a sidecar container: `docker build -t relay .`, then see deploy/README.md.
FROM python:3.11-slim-bookworm

# pip installs into the image's own Python as root on purpose; its warning about that is noise.
ARG PIP_ROOT_USER_ACTION=ignore
ARG PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed numeric id, so that Kubernetes' runAsNonRoot can verify it and a volume's owner is known.
RUN groupadd --system --gid 10001 relay \
 && useradd --system --uid 10001 --gid relay --no-log-init --no-create-home \
      --home-dir /data --shell /usr/sbin/nologin relay \
 && mkdir /data \
 && chown relay:relay /data

WORKDIR /src

# Dependencies come from pyproject.toml alone, so a change to the code reuses this layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > requirements.txt \
 && pip install --no-cache-dir -r requirements.txt

# setuptools reads README.md as the package's long description, so the build needs it.
COPY README.md ./
COPY relay/ relay/
RUN pip install --no-cache-dir --no-deps .

# The default config; mount your own file over it (or over /etc/relay) to change the rules.
COPY config/relay.yaml /etc/relay/relay.yaml

# The shipped config reads these through ${VAR:-default}; write keys and the like come from the
# environment at run time and are never baked in. RELAY_LISTEN is also what the health check reads.
ENV RELAY_CONFIG=/etc/relay/relay.yaml \
    RELAY_DB=/data/relay.db \
    RELAY_LISTEN=0.0.0.0:8080

# The outbox must outlive the container: every accepted message waits here until delivered.
# /data is also the working directory, so that a relative storage.path lands in the volume too.
WORKDIR /data
VOLUME /data
EXPOSE 8080
USER 10001:10001

# No curl in the image: the check uses Python's own urllib, and urlopen raises (exit 1) on 503.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; port = os.environ['RELAY_LISTEN'].rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/readyz', timeout=4)"]

# relay stops cleanly on SIGTERM (docker stop's signal): it lets requests in flight finish and
# leaves undelivered messages in /data for the next start. Give it `stop_grace_period` >= 20s.
ENTRYPOINT ["relay"]
CMD ["serve"]
