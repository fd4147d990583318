# One image for every paymentsvc command: `docker run IMAGE serve usage`, `... migrate`.
#
# Built as a wheel and installed as one: migrations, SQL and the default catalog are
# package data (found through importlib.resources), so the image holds no source tree
# and needs no PYTHONPATH.
FROM python:3.11-slim AS build
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 paymentsvc \
    && useradd --system --uid 10001 --gid paymentsvc --create-home \
        --home-dir /home/paymentsvc --shell /usr/sbin/nologin paymentsvc

COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels

# Numeric, so Kubernetes can verify `runAsNonRoot` without reading /etc/passwd
# (a named user is refused there); infra/k8s runs the pods as this uid.
USER 10001:10001
WORKDIR /home/paymentsvc

ENTRYPOINT ["paymentsvc"]
CMD ["--help"]
