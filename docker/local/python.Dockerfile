# A stand-in for python:3.11-slim made from Debian's packages (Debian bookworm ships 3.11), for
# machines that cannot pull from an image registry. Built by docker/local-images.sh.
ARG DEBIAN_IMAGE=slimgpt-local/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
CMD ["python3"]
