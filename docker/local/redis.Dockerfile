# A stand-in for redis:7-alpine made from Debian's redis-server package (7.0), for machines that
# cannot pull from an image registry. Same conventions as the official image: the working
# directory /data (where an AOF or RDB file goes) and `redis-server ARGS` as the command.
ARG DEBIAN_IMAGE=slimgpt-local/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data && chown redis:redis /data
COPY redis-entrypoint.sh /usr/local/bin/redis-entrypoint
WORKDIR /data
VOLUME /data
USER redis
EXPOSE 6379
ENTRYPOINT ["redis-entrypoint"]
CMD ["redis-server"]
