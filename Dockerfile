# The ESIR server as a container image: a static esir binary plus Debian's iPXE
# boot files. Run with host networking (DHCP and TFTP need the LAN):
#   docker build -t esir . && docker run --net=host -v /var/lib/esir:/var/lib/esir esir server
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o /out/esir ./cmd/esir \
 && CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o /out/esir-agent ./cmd/esir-agent

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ipxe e2fsprogs ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/esir /out/esir-agent /usr/local/bin/
VOLUME /var/lib/esir
ENTRYPOINT ["/usr/local/bin/esir"]
CMD ["server"]
