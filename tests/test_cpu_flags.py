"""ea_local/cpu_flags.py: the CPU instruction sets the build compiles in, from recorded /proc/cpuinfo lines.

No compiler and no model needed: the compiler probe is replaced by a set of accepted flags."""
from __future__ import annotations

import re
import shlex
import tarfile
from pathlib import Path

import pytest

from ea_local import cpu_flags as cf

# Recorded /proc/cpuinfo lines (one CPU each).
# Intel Xeon Sapphire Rapids (a cloud VM, 4th-gen Xeon): AVX-512 with VNNI/BF16/FP16, AVX-VNNI, AMX
SAPPHIRE_RAPIDS = (
    "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz\n"
    "flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss "
    "ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid tsc_known_freq pni "
    "pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm abm "
    "3dnowprefetch ssbd ibrs ibpb stibp ibrs_enhanced fsgsbase tsc_adjust bmi1 hle avx2 smep bmi2 erms invpcid rtm "
    "avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec "
    "xgetbv1 xsaves avx_vnni avx512_bf16 arat avx512vbmi umip pku ospke waitpkg avx512_vbmi2 gfni vaes vpclmulqdq "
    "avx512_vnni avx512_bitalg avx512_vpopcntdq rdpid cldemote movdiri movdir64b fsrm md_clear serialize tsxldtrk "
    "amx_bf16 avx512_fp16 amx_tile amx_int8 flush_l1d arch_capabilities\n"
    "bugs\t\t: spectre_v1 spectre_v2 spec_store_bypass swapgs\n")
# AMD EPYC Zen 2 (Rome): AVX2, FMA, F16C, BMI2; no AVX-512
ZEN2 = (
    "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B12\n"
    "flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht "
    "syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid extd_apicid "
    "tsc_known_freq pni pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand "
    "hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw topoext ssbd ibrs ibpb stibp "
    "vmmcall fsgsbase tsc_adjust bmi1 avx2 smep bmi2 rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 "
    "clzero xsaveerptr arat npt nrip_save umip rdpid\n")
# Intel Xeon E5-2670 (Sandy Bridge): AVX only, no AVX2/FMA/F16C/BMI2
SANDY_BRIDGE = (
    "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU E5-2670 0 @ 2.60GHz\n"
    "flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush dts acpi mmx fxsr "
    "sse sse2 ss ht tm pbe syscall nx pdpe1gb rdtscp lm constant_tsc arch_perfmon pebs bts rep_good nopl xtopology "
    "nonstop_tsc aperfmperf pni pclmulqdq dtes64 monitor ds_cpl vmx smx est tm2 ssse3 cx16 xtpr pdcm pcid dca sse4_1 "
    "sse4_2 x2apic popcnt tsc_deadline_timer aes xsave avx lahf_lm epb pti ssbd ibrs ibpb stibp tpr_shadow vnmi "
    "flexpriority ept vpid xsaveopt dtherm ida arat pln pts md_clear flush_l1d\n")
# AWS Graviton2 (Neoverse N1), aarch64
GRAVITON2 = (
    "processor\t: 0\nBogoMIPS\t: 243.75\n"
    "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp "
    "ssbs\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n")

X86_SWITCHES = [*cf.X86_OPTIONS, *cf.X86_OFF_ALWAYS]


def every(flag: str) -> bool:
    return True


def options(choice: cf.Choice) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in choice.cmake_args if a.startswith("-DGGML_"))


def extra(choice: cf.Choice) -> list[str]:
    c = [a.split("=", 1)[1] for a in choice.cmake_args if a.startswith("-DCMAKE_C_FLAGS=")]
    cxx = [a.split("=", 1)[1] for a in choice.cmake_args if a.startswith("-DCMAKE_CXX_FLAGS=")]
    assert c == cxx
    return c[0].split() if c else []


def x86(text: str, level: str = "auto", supports=every) -> cf.Choice:
    return cf.choose(level, cpuinfo=text, machine="x86_64", system="Linux", supports=supports)


def test_parse_cpuinfo_takes_the_flags_or_features_line():
    assert {"amx_int8", "avx512_fp16", "avx2"} <= cf.parse_cpuinfo(SAPPHIRE_RAPIDS)
    assert "spectre_v1" not in cf.parse_cpuinfo(SAPPHIRE_RAPIDS)  # the bugs line is not features
    assert {"asimd", "asimddp", "fphp"} <= cf.parse_cpuinfo(GRAVITON2)
    assert cf.parse_cpuinfo("processor : 0\n") == frozenset()


def test_amx_intel_gets_everything_but_amx():
    c = x86(SAPPHIRE_RAPIDS)
    o = options(c)
    assert o["GGML_NATIVE"] == "OFF"  # -march=native would compile the AMX kernels
    assert {k for k, v in o.items() if v == "ON"} == set(cf.X86_OPTIONS)  # every ggml ISA option the CPU has
    assert o["GGML_AMX_TILE"] == o["GGML_AMX_INT8"] == o["GGML_AMX_BF16"] == "OFF"
    assert not any("amx" in a.lower() and not a.endswith("=OFF") for a in c.cmake_args)
    # what -march=native also defines there and ggml reads: FP16 arithmetic, GFNI, the native tuning
    assert extra(c) == ["-mtune=native", "-mavx512fp16", "-mgfni"]
    assert "AMX off (the CPU has AMX: not compiled)" in c.summary


def test_older_compiler_leaves_unknown_flags_out():
    # GCC 11 (Ubuntu 22.04) knows AMX and AVX-VNNI but not -mavx512fp16
    c = x86(SAPPHIRE_RAPIDS, supports=lambda f: f != "-mavx512fp16")
    assert "-mavx512fp16" not in extra(c) and "-mgfni" in extra(c)
    assert options(x86(SAPPHIRE_RAPIDS, supports=lambda f: f != "-mavxvnni"))["GGML_AVX_VNNI"] == "OFF"
    # an option whose ggml flags the compiler rejects is off, and so is what builds on it
    o = options(x86(SAPPHIRE_RAPIDS, supports=lambda f: f != "-mavx512bw"))
    assert o["GGML_AVX512"] == o["GGML_AVX512_VNNI"] == o["GGML_AVX512_BF16"] == "OFF" and o["GGML_AVX2"] == "ON"


def test_avx2_amd_has_no_avx512():
    o = options(x86(ZEN2))
    on = {k for k, v in o.items() if v == "ON"}
    assert on == {"GGML_SSE42", "GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2"}
    assert o["GGML_NATIVE"] == "OFF"
    assert extra(x86(ZEN2)) == ["-mtune=native"]


def test_avx_only_cpu_turns_off_what_ggml_would_turn_on():
    """With GGML_NATIVE=OFF ggml defaults AVX2/FMA/F16C/BMI2 to ON: they must be OFF explicitly or the
    build would SIGILL on Sandy Bridge."""
    o = options(x86(SANDY_BRIDGE))
    assert o["GGML_AVX"] == "ON" and o["GGML_SSE42"] == "ON"
    for opt in ("GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2", "GGML_AVX512", "GGML_AVX_VNNI"):
        assert o[opt] == "OFF", opt


@pytest.mark.parametrize("text", [SAPPHIRE_RAPIDS, ZEN2, SANDY_BRIDGE])
def test_every_x86_switch_is_named_once(text):
    for level in ("auto", "safe"):
        args = x86(text, level).cmake_args
        for opt in ["GGML_NATIVE", *X86_SWITCHES]:
            assert sum(a.startswith(f"-D{opt}=") for a in args) == 1, (opt, level)


def test_arm_keeps_the_native_build():
    c = cf.choose("auto", cpuinfo=GRAVITON2, machine="aarch64", system="Linux", supports=every)
    assert c.cmake_args == ()  # GGML_NATIVE stays llama.cpp's default: -mcpu=native
    assert cf.choose("safe", cpuinfo=GRAVITON2, machine="aarch64", system="Linux").cmake_args == ("-DGGML_NATIVE=OFF",)
    assert cf.choose("auto", machine="arm64", system="Darwin").cmake_args == ()
    assert cf.choose("auto", machine="x86_64", system="Darwin").cmake_args == ()  # Intel Macs: no AMX


def test_safe_is_at_most_avx2_and_native_passes_nothing():
    o = options(x86(SAPPHIRE_RAPIDS, "safe"))
    assert {k for k, v in o.items() if v == "ON"} == set(cf.SAFE_X86)
    assert extra(x86(SAPPHIRE_RAPIDS, "safe")) == []
    assert {k for k, v in options(x86(SANDY_BRIDGE, "safe")).items() if v == "ON"} == {"GGML_SSE42", "GGML_AVX"}
    assert x86(SAPPHIRE_RAPIDS, "native").cmake_args == ()
    with pytest.raises(ValueError, match="unknown CPU flag level"):
        cf.choose("fast")


def test_unreadable_cpuinfo():
    assert x86("", "auto").cmake_args == ()
    o = options(x86("", "safe"))
    assert o["GGML_NATIVE"] == "OFF" and all(o[k] == "OFF" for k in X86_SWITCHES)


def test_compiler_probe_with_a_stand_in_compiler(tmp_path):
    cc = tmp_path / "cc"
    cc.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = "-mavx512fp16" ] && exit 1; done\nexit 0\n')
    cc.chmod(0o755)
    probe = cf.compiler_probe([str(cc)])
    assert probe("-mavx2") and not probe("-mavx512fp16")
    # a compiler that cannot run is not judged: the build reports it
    assert cf.compiler_probe([str(tmp_path / "missing")])("-mavx512fp16")


def test_cmake_args_survive_the_cmake_args_variable():
    args = list(x86(SAPPHIRE_RAPIDS).cmake_args)
    assert shlex.split(shlex.join(args)) == args  # scikit-build-core splits CMAKE_ARGS with shlex


def _sdist() -> Path | None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("b", Path(__file__).parent.parent / "scripts" / "build_llama.py")
    b = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(b)
    p = b.cache_dir() / "sdist" / b.SDIST_NAME
    return p if p.exists() else None


def test_options_and_compiler_flags_match_the_pinned_llama_cpp():
    """Every option exists in the vendored ggml/CMakeLists.txt, and the compiler flags each option adds in
    ggml/src/ggml-cpu/CMakeLists.txt are the ones the probe checks."""
    sd = _sdist()
    if sd is None:
        pytest.skip("the pinned sdist is not cached here (scripts/build_llama.py downloads it)")
    with tarfile.open(sd) as tf:
        root = tf.getnames()[0].split("/")[0] + "/vendor/llama.cpp/ggml/"
        top = tf.extractfile(root + "CMakeLists.txt").read().decode()
        cpu = tf.extractfile(root + "src/ggml-cpu/CMakeLists.txt").read().decode()
    for opt in ["GGML_NATIVE", *X86_SWITCHES]:
        assert re.search(rf"option\({opt}\s", top), opt
    gcc = cpu[cpu.index("if (GGML_NATIVE)\n                list(APPEND ARCH_FLAGS -march=native)"):]
    for opt, (_, cflags) in cf.X86_OPTIONS.items():
        block = re.search(rf"if \({opt}\)\n(.*?)endif", gcc, re.S).group(1)
        assert re.findall(r"ARCH_FLAGS (-m\S+)\)", block) == list(cflags), opt
