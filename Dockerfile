# Tollgate production image: one image for web (gunicorn), worker and beat (celery).
# Build:  docker build -t tollgate .
# The process to run is chosen by docker-compose.yml (or your orchestrator); the default is the web server.
FROM python:3.11-slim

# PYTHONPATH: import the project from /app (not site-packages) so settings.BASE_DIR finds templates/, static/
# and staticfiles/; `pip install .` still provides the dependencies and the `tollgate` entry point.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app

WORKDIR /app

RUN groupadd --system --gid 10001 tollgate \
 && useradd --system --uid 10001 --gid tollgate --create-home --home-dir /home/tollgate --shell /usr/sbin/nologin tollgate

COPY . .

# Installs the dependencies and the `tollgate` console entry point.
RUN pip install . && rm -rf build ./*.egg-info

# Static files are collected at build time. The secrets below are throwaway dummies that exist only for
# this RUN step (they are not baked into the image's environment); real ones come from the runtime env.
RUN DEBUG=0 \
    SECRET_KEY=build-only-dummy-secret-key-not-used-at-runtime \
    TOLLGATE_ENCRYPTION_KEYS=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= \
    TOLLGATE_VAR_DIR=/tmp/build-var \
    python manage.py collectstatic --noinput \
 && rm -rf /tmp/build-var \
 && install -d -o tollgate -g tollgate /app/var /app/var/spool

# Source and collected static files stay root-owned (read-only to the app); only var/ and $HOME are writable.
USER 10001:10001

EXPOSE 8000

# Worker class, processes and connections: governance/gunicorn_conf.py (WEB_* variables, see README).
CMD ["gunicorn", "--config", "python:governance.gunicorn_conf"]
