/*
 * bind_loopback.c - LD_PRELOAD shim that keeps a server on the loopback interface.
 *
 * Orthanc 1.10 (Debian 12) has no bind-address option: its HTTP server (CivetWeb) and its DICOM
 * server (DCMTK) bind the wildcard address. Preloading this library rewrites every bind() to the
 * wildcard address into a bind to loopback:
 *   AF_INET  0.0.0.0 (INADDR_ANY)  -> 127.0.0.1 (INADDR_LOOPBACK)
 *   AF_INET6 ::      (in6addr_any) -> ::1       (in6addr_loopback)
 * Ports and every other address are passed through unchanged. Nothing else is wrapped.
 *
 * Build: gcc -shared -fPIC -O2 -Wall -Wextra -o bind_loopback.so bind_loopback.c -ldl
 * Use:   LD_PRELOAD=/path/bind_loopback.so /usr/sbin/Orthanc config.json
 * (scripts/install-servers.sh builds it; medvlm/devservers.py preloads it when present.)
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

static bind_fn real_bind;

/* Resolved once at load time, before the program starts threads. */
__attribute__((constructor)) static void resolve_real_bind(void) {
    real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
}

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    if (real_bind == NULL) {
        resolve_real_bind();
        if (real_bind == NULL) {
            errno = ENOSYS;
            return -1;
        }
    }
    if (addr != NULL && addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        struct sockaddr_in in4;
        memcpy(&in4, addr, sizeof in4);
        if (in4.sin_addr.s_addr == htonl(INADDR_ANY)) {
            in4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            return real_bind(fd, (const struct sockaddr *)&in4, sizeof in4);
        }
    } else if (addr != NULL && addr->sa_family == AF_INET6 &&
               len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 in6;
        memcpy(&in6, addr, sizeof in6);
        if (memcmp(&in6.sin6_addr, &in6addr_any, sizeof in6.sin6_addr) == 0) {
            in6.sin6_addr = in6addr_loopback;
            return real_bind(fd, (const struct sockaddr *)&in6, sizeof in6);
        }
    }
    return real_bind(fd, addr, len);
}
