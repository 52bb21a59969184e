SUMMARY = "Crayon: on-device LLM service with instant LoRA-pool customization"
DESCRIPTION = "crayond serves one on-device language model to every app on the board over a \
               local socket (libcrayon), D-Bus and HTTP; apps customize it from a few examples in \
               milliseconds by blending a pool of LoRA adapters, and hard questions can be routed \
               to a server."
HOMEPAGE = "https://github.com/crayon-llm/crayon"
BUGTRACKER = "https://github.com/crayon-llm/crayon/issues"
SECTION = "libs"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://LICENSE;md5=3b83ef96387f14655fc854ddc3c6bd57"
CVE_PRODUCT = "crayon"

SRC_URI = "git://github.com/crayon-llm/crayon.git;protocol=https;branch=main"
# Bump together with crayon-crates.inc (yocto/gen-crates.py) when updating.
SRCREV = "62267dc0cc9654dadeacb5308ee45ed01a208687"

require ${BPN}-crates.inc

inherit cargo cargo-update-recipe-crates systemd useradd

do_install:append() {
    # The cargo class installs crayond and crayonctl; add libcrayon, its header and the service files.
    install -d ${D}${libdir} ${D}${includedir}
    install -m 0755 ${B}/target/${CARGO_TARGET_SUBDIR}/libcrayon.so ${D}${libdir}/libcrayon.so.0
    ln -sf libcrayon.so.0 ${D}${libdir}/libcrayon.so
    install -m 0644 ${B}/target/${CARGO_TARGET_SUBDIR}/libcrayon.a ${D}${libdir}/libcrayon.a
    install -m 0644 ${S}/include/crayon.h ${D}${includedir}/crayon.h

    install -d ${D}${systemd_system_unitdir} ${D}${nonarch_libdir}/sysusers.d ${D}${nonarch_libdir}/tmpfiles.d
    install -m 0644 ${S}/systemd/crayond.service ${D}${systemd_system_unitdir}/crayond.service
    install -m 0644 ${S}/systemd/crayon.sysusers ${D}${nonarch_libdir}/sysusers.d/crayon.conf
    install -m 0644 ${S}/systemd/crayon.tmpfiles ${D}${nonarch_libdir}/tmpfiles.d/crayon.conf

    install -d ${D}${datadir}/dbus-1/system.d ${D}${datadir}/dbus-1/system-services
    install -m 0644 ${S}/dbus/org.crayon.Crayon1.conf ${D}${datadir}/dbus-1/system.d/org.crayon.Crayon1.conf
    install -m 0644 ${S}/dbus/org.crayon.Crayon1.service ${D}${datadir}/dbus-1/system-services/org.crayon.Crayon1.service

    install -d ${D}${sysconfdir}/crayon
    install -m 0640 ${S}/config/crayond-system.toml ${D}${sysconfdir}/crayon/crayon.toml
}

FILES:${PN} += "${systemd_system_unitdir}/crayond.service \
                ${nonarch_libdir}/sysusers.d/crayon.conf \
                ${nonarch_libdir}/tmpfiles.d/crayon.conf \
                ${datadir}/dbus-1/system.d/org.crayon.Crayon1.conf \
                ${datadir}/dbus-1/system-services/org.crayon.Crayon1.service \
                ${libdir}/libcrayon.so.0 \
"
FILES:${PN}-dev += "${includedir}/crayon.h ${libdir}/libcrayon.so"
FILES:${PN}-staticdev += "${libdir}/libcrayon.a"

CONFFILES:${PN} = "${sysconfdir}/crayon/crayon.toml"

# ONNX Runtime is loaded at run time (dlopen, ort's load-dynamic): nothing links against it, but
# crayond needs libonnxruntime.so.1.31 on the target. Provide it with an onnxruntime recipe (see
# yocto/README.md) and point runtime.ort_library at it.
RDEPENDS:${PN} += "dbus onnxruntime"

USERADD_PACKAGES = "${PN}"
GROUPADD_PARAM:${PN} = "--system crayon"
USERADD_PARAM:${PN} = "--system --home-dir ${localstatedir}/lib/crayon --no-create-home --shell ${base_sbindir}/nologin --gid crayon crayon"

SYSTEMD_SERVICE:${PN} = "crayond.service"
SYSTEMD_AUTO_ENABLE:${PN} = "enable"
