"""nestvisor's own bundled x86 guests, written for this project in GNU as.

Guests (sources in ``src/``, built by ``build.build(name)`` into ELF32
multiboot v1 kernels, cached by source hash; ``python -m
nestvisor.guests.build [NAME...]`` prints their paths):

``selftest``
    The engine's conformance guest. Entered by a multiboot loader in 32-bit
    protected mode with paging off (EAX=0x2BADB002, EBX=mbi), it builds its
    own GDT, TSS (IST1) and page tables, enters long mode through
    rdmsr/wrmsr of EFER and CR0.PG, installs an IDT, and checks exception
    delivery (#UD, #DE, #BP, int $0x80, #GP, #PF with CR2 and error codes,
    IST stacks), reserved-value #GPs (unknown MSR, EFER, CR4, CR0, PAT),
    MSR round trips, RDTSC, CPUID, CR8/TPR, unassigned port reads, the local
    APIC (SPIV, ID, version, one-shot and periodic timer), fw_cfg NB_CPUS,
    and with 2+ CPUs an INIT/SIPI AP start (real mode -> long mode) and an
    IPI round trip, then the alignment check (#AC at CPL 3 with CR0.AM and
    RFLAGS.AC) and nestvisor's deterministic clock (tsc_instruction_clock:
    TSC reads in one straight-line block differ by the instructions between
    them). Validated under QEMU TCG, which lacks seven of the
    architectural checks: rdmsr_unknown, wrmsr_efer_reserved, cr0_nw,
    cr0_pg_no_pe and pat_invalid fail there (no #GP), alignment_check too
    (no #AC), and cr4_reserved hangs QEMU 7.2 TCG (run it with
    ``-append "-cr4_reserved"``). Unicorn lacks the same checks, so on
    nestvisor these lines test the engine's own. tsc_instruction_clock
    fails there too: TCG's TSC follows the host's clock.

``demo``
    The workload behind ``nestvisor demo``: narrates port I/O, MSR and CR
    traps, exceptions, a CPUID/RDTSC loop and an APIC timer wake-up from
    hlt, then exits with code 0. Every line starts with ``demo:``.

``svmtest``
    An L1 SVM hypervisor (boot with profile ``svm``; svm.h holds the VMCB
    layout, vmcb_setup and vm_enter): enables EFER.SVME and VM_HSAVE_PA and
    runs L2 guests in 64-bit mode through VMLOAD/VMRUN/VMSAVE under
    CLGI/STGI. TAP checks: the SVM instructions' #UD and #GP, VMLOAD/VMSAVE,
    exits for VMMCALL (with NRIPS next_rip), CPUID, IOIO through the IOPM,
    MSR through the MSRPM, CR0/CR3 accesses, #UD and #PF intercepts, INVLPG,
    RDTSC, PAUSE, HLT, VMRUN in L2 and SHUTDOWN; GIF holding a self-IPI,
    the INTR intercept; EVENTINJ of an exception with error code and of an
    interrupt; V_IRQ with and without the VINTR intercept; nested paging
    (identity, a remapped page, NPF with error code and GPA); one invalid
    vmcb12 per VMRUN consistency check (SVM_EXIT_ERR); vmcb12 rewritten by
    L2 while it runs; the int_ctl V_TPR/V_IRQ split. Validated under QEMU
    TCG (``-cpu qemu64,+svm,+npt``) except the IDs listed in
    tests/test_nested_svm.py SVM_QEMU_TCG_GAPS.

``svmdemo``
    The workload behind ``nestvisor demo --arch svm``: an L1 SVM hypervisor
    whose L2 loop exits for CPUID, port I/O, RDMSR, HLT and VMMCALL; L1
    prints its own count of #VMEXITs by code. Lines start with ``svmdemo:``.

``svmloop``
    1000 VMRUN/#VMEXIT round trips of an L2 CPUID loop answered by an L1
    SVM hypervisor; its console text is the same under QEMU TCG
    (``-cpu qemu64,+svm,+npt``), which tests/test_nested_svm.py checks.

Output protocol (selftest, demo and the svm guests alike):

- Text on COM1 (port 0x3f8; each byte after polling LSR 0x3fd bit 5).
- ``selftest`` prints TAP: ``ok N - name``, ``not ok N - name (check K:
  got G want W; last exception vec V error E rip R cr2 C)`` or ``ok N - name
  # SKIP reason``; ``#`` lines are comments; at the end ``1..N``, ``# skip S``
  and ``# pass P fail F`` (skips count as passes). ``tap.parse`` reads it.
- The exit code goes to the isa-debug-exit port 0xf4 with a 32-bit ``out``:
  0 when every test passed, 1 when any failed, 63 after ``Bail out!`` (an
  exception no test expected). QEMU turns code c into process status
  ``(c << 1) | 1``: 1, 3, 127.
- The multiboot command line may hold words ``-ID`` that skip the selftest
  test with that ID (the second field of its ``DEFTEST`` line), so an
  oracle with a known gap can still run the rest, e.g.
  ``qemu-system-x86_64 ... -append "-cr4_reserved"``.

Memory the guests use: the image at 1 MiB (below 2 MiB, asserted at link
time); a not-present page at 0x201000 and a read-only page at 0x202000; the
xAPIC at 0xfee00000; the AP trampoline at 0x8000 (SIPI vector 0x08), which
overwrites whatever the loader left there after boot.
"""
