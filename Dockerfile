# One image for every paymentsvc command: `docker run IMAGE serve usage`, `... migrate`.
#
# The project installs with `pip install .` (dependencies, the `payment` package from gen/,
# the `paymentsvc` console script). The source tree stays at /app and comes first on
# PYTHONPATH, because `shared.migrate` and the default catalog path look for `migrations/`
# and `catalog/` beside the `shared` package (PROJECT_ROOT), and those are not package data.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app:/app/gen

RUN groupadd --system --gid 10001 paymentsvc \
    && useradd --system --uid 10001 --gid paymentsvc --create-home \
        --home-dir /home/paymentsvc --shell /usr/sbin/nologin paymentsvc

WORKDIR /app
COPY . .
# setuptools builds in the source tree: drop what it leaves there in the same layer.
RUN pip install . \
    && rm -rf build ./*.egg-info

USER paymentsvc
# A writable working directory (Faust keeps its table data under the working directory).
WORKDIR /home/paymentsvc

ENTRYPOINT ["paymentsvc"]
CMD ["--help"]
