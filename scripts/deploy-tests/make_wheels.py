"""Stand-in wheels of NVIDIA's CUDA 13 runtime packages, for the deploy kit's tests.

    python3 make_wheels.py LIBDIR OUTDIR

Each wheel has the real package's name, version, platform tag and file layout
(nvidia/cu13/lib/libX.so.N) but carries a stand-in library from LIBDIR (standin-lib.c), so
`pip install --no-index --find-links OUTDIR --target DIR nvidia-cublas==13.0.2.14` runs the same
pip code path as on a rented machine, without the network and without 1 GB of downloads.
"""

import base64
import hashlib
import os
import sys
import zipfile

# (distribution, version, wheel tag, [(path in the wheel, stand-in library file)])
WHEELS = [
    ("nvidia_cuda_runtime", "13.0.96", "py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64",
     [("nvidia/cu13/lib/libcudart.so.13", "libcudart.so.13")]),
    ("nvidia_cuda_nvrtc", "13.0.88", "py3-none-manylinux2010_x86_64.manylinux_2_12_x86_64",
     [("nvidia/cu13/lib/libnvrtc.so.13", "libnvrtc.so.13")]),
    ("nvidia_cublas", "13.0.2.14", "py3-none-manylinux_2_27_x86_64",
     [("nvidia/cu13/lib/libcublas.so.13", "libcublas.so.13"),
      ("nvidia/cu13/lib/libcublasLt.so.13", "libcublasLt.so.13")]),
    ("nvidia_curand", "10.4.0.35", "py3-none-manylinux_2_27_x86_64",
     [("nvidia/cu13/lib/libcurand.so.10", "libcurand.so.10")]),
    ("nvidia_nccl_cu13", "2.30.7", "py3-none-manylinux_2_18_x86_64",
     [("nvidia/nccl/lib/libnccl.so.2", "libnccl.so.2")]),
]


def record_line(path, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def main():
    libdir, outdir = sys.argv[1], sys.argv[2]
    os.makedirs(outdir, exist_ok=True)
    for dist, version, tag, files in WHEELS:
        info = f"{dist}-{version}.dist-info"
        name = dist.replace("_", "-")
        entries = []
        for path, lib in files:
            with open(os.path.join(libdir, lib), "rb") as f:
                entries.append((path, f.read(), 0o755))
        entries.append((f"{info}/METADATA",
                        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                        "Summary: stand-in for the deploy kit's tests\n".encode(), 0o644))
        wheel_tags = "".join(f"Tag: {t}\n" for t in
                             (f"py3-none-{p}" for p in tag.split("-", 2)[2].split(".")))
        entries.append((f"{info}/WHEEL",
                        ("Wheel-Version: 1.0\nGenerator: ablate-tests\nRoot-Is-Purelib: true\n"
                         + wheel_tags).encode(), 0o644))
        entries.append((f"{info}/top_level.txt", b"nvidia\n", 0o644))
        record = [record_line(p, d) for p, d, _ in entries] + [f"{info}/RECORD,,"]
        entries.append((f"{info}/RECORD", ("\n".join(record) + "\n").encode(), 0o644))
        out = os.path.join(outdir, f"{dist}-{version}-{tag}.whl")
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
            for path, data, mode in entries:
                zi = zipfile.ZipInfo(path, date_time=(2025, 1, 1, 0, 0, 0))
                zi.external_attr = (0o100000 | mode) << 16
                zi.compress_type = zipfile.ZIP_DEFLATED
                z.writestr(zi, data)


if __name__ == "__main__":
    main()
