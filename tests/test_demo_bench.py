"""`nestvisor demo` and `nestvisor bench` end to end on the real engine."""

import argparse
import json

from nestvisor import bench
from nestvisor.guests import demo


def test_demo_vmx_runs_l2_and_summarises(capsys):
    assert demo.run(argparse.Namespace(arch="vmx")) == 0
    out = capsys.readouterr().out
    assert "vmxdemo: L2 runs its loop" in out
    assert "vmxdemo: done, exiting with code 0" in out
    summary = out[out.index("nestvisor demo summary"):]
    rows = {line[:36].strip(): line[36:].split() for line in summary.splitlines()[2:] if line.startswith("  ")}
    assert rows["nested VM exits"] == ["1,217", "1,217"]
    for reason, n in (("CPUID", "400"), ("IO_INSTRUCTION", "400"), ("MSR_READ", "400"), ("HLT", "8"),
                      ("VMCALL", "9")):
        assert rows[reason] == [n, n], reason
    assert rows["rare-field syncs"] == ["9", "1,217"]
    lazy, eager = (float(x) for x in rows["vmcs12 fields copied per exit"])
    assert lazy < eager
    assert "guest exit status (lazy sync): 1 (pass)" in summary
    assert "guest exit status (eager sync): 1 (pass)" in summary


def test_demo_engine_summary(capsys):
    assert demo.run(argparse.Namespace(arch="engine")) == 0
    out = capsys.readouterr().out
    assert "demo: nestvisor demo guest, in 64-bit long mode" in out
    assert "demo: done, exiting with code 0" in out
    assert "guest exit status: 1 (debug-exit code 0: pass)" in out
    summary = out[out.index("nestvisor demo summary"):]
    assert summary.startswith("nestvisor demo summary (--arch engine: the L0 engine alone, no L1/L2)")
    for kind in ("KVM_EXIT_IO", "CPUID", "RDMSR", "WRMSR", "MOV_TO_CR", "MOV_FROM_CR",
                 "RDTSC", "HLT", "IN", "OUT"):
        assert f"\n  {kind} " in summary, kind
    for vector in ("vector 3   #BP", "vector 6   #UD", "vector 13  #GP", "vector 14  #PF",
                   "vector 64  interrupt"):
        assert vector in summary, vector


def test_demo_svm_runs_l2_and_summarises(capsys):
    assert demo.run(argparse.Namespace(arch="svm")) == 0
    out = capsys.readouterr().out
    assert "svmdemo: L2 runs its loop" in out
    # L1's own count of its #VMEXITs, printed by the guest
    for line in ("cpuid 400", "io 400", "msr 400", "hlt 8", "hypercall 9"):
        assert f"svmdemo:   {line}\n" in out, line
    assert "svmdemo: done, exiting with code 0" in out
    summary = out[out.index("nestvisor demo summary (--arch svm"):]
    rows = {line[:32].strip(): line[32:].split() for line in summary.splitlines() if line.startswith("  ")}
    assert rows["nested VMRUNs"] == rows["nested #VMEXITs"] == ["1,217"]
    assert rows["failed VMRUNs (SVM_EXIT_ERR)"] == ["0"]
    # the L0's count by exit code, with KVM's trace names, in code order
    codes = [line.split()[0] for line in summary.splitlines() if line.startswith("    0x")]
    assert codes == ["0x072", "0x078", "0x07b", "0x07c", "0x081"]
    for label, n in (("0x072 cpuid", "400"), ("0x078 hlt", "8"), ("0x07b io", "400"), ("0x07c msr", "400"),
                     ("0x081 hypercall", "9")):
        assert rows[label] == [n], label
    # vm_enter: one VMRUN, CLGI and STGI per exit, VMLOAD and VMSAVE of host and guest state
    assert rows["L1 VMRUN"] == rows["L1 CLGI"] == rows["L1 STGI"] == ["1,217"]
    assert rows["L1 VMLOAD"] == ["2,434"] and rows["L1 VMSAVE"] == ["2,435"]   # + vmcb_setup's VMSAVE
    assert rows["wall time per #VMEXIT"][1] == "µs"
    assert "guest exit status: 1 (pass)" in summary


def test_bench_quick_json(capsys):
    assert bench.main(["--quick", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    iterations = bench.LOOP_INSNS_QUICK // 2
    # mov ecx; N x (dec ecx; jnz); hlt, counted by the vCPU clock
    assert r["loop_instructions"] == r["loop_expected_instructions"] == 2 * iterations + 2
    # Python sees every CPUID and RDMSR, and only the first run of the RDTSC site
    assert r["trapped"] == {"CPUID": bench.TRAP_ITERATIONS_QUICK, "RDMSR": bench.TRAP_ITERATIONS_QUICK, "RDTSC": 1}
    assert abs(r["nestvisor_rdtsc_us"]) < r["nestvisor_cpuid_us"]   # within noise of a bare loop
    assert r["nested_exits"] == 1001   # 1000 CPUIDs and the final VMCALL
    assert r["nested_round_trip_lazy_us"] > 0 and r["nested_round_trip_eager_us"] > 0
    assert r["nested_fields_per_exit_lazy"] < r["nested_fields_per_exit_eager"]
    # every NMI arrived (the bench raises otherwise) and each took a measurable time
    assert r["ipi_iterations"] == bench.IPI_ITERATIONS_QUICK and r["ipi_round_trip_us"] > 0
    for key in ("nestvisor_loop_mips", "unicorn_loop_mips", "nestvisor_cpuid_us", "nestvisor_rdmsr_us",
                "unicorn_hook_insn_cpuid_us", "unicorn_hook_code_cpuid_us"):
        assert r[key] > 0, key


def test_bench_table(capsys):
    assert bench.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "MIPS" in out and "trapped CPUID" in out and "IPI round trip" in out and "µs" in out
