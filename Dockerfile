# CPU image with exactly the README's set-up: `make setup` installs the pinned pyproject.toml.
# Untested here (no Docker engine on the development machines); GPU users can start FROM an
# NVIDIA CUDA runtime image with Python 3.11 instead, since the pinned torch wheel bundles CUDA.
FROM python:3.11-slim

RUN apt-get update && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml Makefile ./
COPY models models
COPY data data
COPY callbacks callbacks
COPY compress compress
RUN make setup

COPY . .
ENTRYPOINT ["make"]
CMD ["train"]
