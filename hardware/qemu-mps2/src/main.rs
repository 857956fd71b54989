//! The microcontroller agent as firmware for QEMU's `mps2-an386`
//! (Cortex-M4F, `thumbv7em-none-eabihf`).
//!
//! This crate only wires the board to `twofold-agent-nostd`:
//!
//! - **link**: CMSDK UART0, bridged by QEMU to a TCP connection to the
//!   gateway (`-chardev socket,...`), the way a modem in transparent mode
//!   carries a device's TCP stream;
//! - **time**: SysTick at 1 kHz; the wall clock (for certificate dates)
//!   from semihosting `SYS_TIME`, standing in for an RTC;
//! - **random numbers**: AES-128 in counter mode keyed with a 128-bit seed
//!   from the command line — QEMU's mps2 has no RNG, so this is for
//!   emulation only; a real board uses its hardware RNG;
//! - **bundle**: read in place from the flash partition at 0x0030_0000,
//!   where a factory (QEMU: `-device loader`) wrote it; renewed chains go
//!   to two 4 KiB slots at 0x0030_8000 and 0x0030_9000 of the same
//!   partition, written with NOR flash's rules (erase sets every bit,
//!   programming only clears bits), which the firmware enforces itself
//!   because QEMU's code memory is plain RAM;
//! - **idle**: WFI, woken by SysTick or a received byte, so an idle device
//!   does not spin a host core;
//! - **log and exit code**: semihosting (QEMU `-semihosting-config
//!   enable=on,target=native`), with the extended exit call so the code
//!   reaches QEMU's exit status.
//!
//! Command line (`-append`): `seed=HEX32 [telemetry=N commands=M
//! renewals=R] [attempts=K] [interval=MS] [clock=0]`. Exit codes: 0 stopped cleanly;
//! 10–18 the agent's failure (see `Error::exit_code`); 20 no valid bundle
//! in flash; 21 bad command line; 99 hard fault; 101 panic.
#![no_std]
#![no_main]

#[cfg(feature = "secure-element")]
mod element;

use core::cell::Cell;
use core::future::Future;
use core::pin::pin;
use core::sync::atomic::{AtomicBool, Ordering};
use core::task::{Context, Poll, Waker};

use aes::cipher::{BlockEncrypt, KeyInit};
use cortex_m::peripheral::syst::SystClkSource;
use cortex_m_rt::{ExceptionFrame, entry, exception};
use cortex_m_semihosting::hprintln;
use critical_section::Mutex;
use rand_core::block::{BlockRng, BlockRngCore};
use twofold_agent_nostd::basic::{BasicApp, Limits};
use twofold_agent_nostd::{Agent, Buffers, ChainSlots, Clock, Connect, Settings, SlotError, Timer};
use twofold_agent_nostd::{
    MCU_MQTT_RX as MQTT_RX, MCU_MQTT_TX as MQTT_TX, MCU_TLS_RX as TLS_RX, MCU_TLS_TX as TLS_TX,
};
use twofold_protocol::Bundle;

/// mps2-an386 runs its core at 25 MHz.
const CORE_HZ: u32 = 25_000_000;
const UART0: usize = 0x4000_4000;

// ---- time -------------------------------------------------------------

static MILLIS: Mutex<Cell<u64>> = Mutex::new(Cell::new(0));

#[exception]
fn SysTick() {
    critical_section::with(|cs| {
        let m = MILLIS.borrow(cs);
        m.set(m.get() + 1);
    });
}

#[derive(Clone, Copy)]
struct Ticks;

impl Timer for Ticks {
    fn now_ms(&self) -> u64 {
        critical_section::with(|cs| MILLIS.borrow(cs).get())
    }

    fn wait_until(&self, deadline: u64) -> impl Future<Output = ()> {
        // Polled again after every interrupt (see `block_on`).
        core::future::poll_fn(move |_| {
            if self.now_ms() >= deadline {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }
}

/// Unix seconds from the host (semihosting SYS_TIME), the stand-in for a
/// battery-backed RTC. `None` if the host gives nothing plausible.
fn unix_secs() -> Option<u64> {
    // SAFETY: SYS_TIME takes no argument block and only returns a value.
    let t = unsafe { cortex_m_semihosting::syscall1(cortex_m_semihosting::nr::TIME, 0) };
    (t > 1_600_000_000).then_some(t as u64)
}

fn unix_ms() -> Option<u64> {
    unix_secs().map(|s| s * 1000)
}

/// The RTC, or no clock at all with `clock=0` (dates then go unchecked;
/// see the verifier's documentation). One type for both, so the agent is
/// compiled once.
struct Rtc {
    enabled: bool,
}

impl Clock for Rtc {
    fn now(&mut self) -> Option<u64> {
        if self.enabled { unix_secs() } else { None }
    }
}

// ---- the UART link ----------------------------------------------------

/// CMSDK APB UART registers.
fn reg(offset: usize) -> *mut u32 {
    (UART0 + offset) as *mut u32
}
const DATA: usize = 0x0;
const STATE: usize = 0x4;
const CTRL: usize = 0x8;
const INTCLEAR: usize = 0xc;
const BAUDDIV: usize = 0x10;
const STATE_TXFULL: u32 = 1;
const STATE_RXFULL: u32 = 2;

struct Uart;

impl Uart {
    fn init() -> Uart {
        // SAFETY: UART0's registers, owned by this firmware alone.
        unsafe {
            reg(BAUDDIV).write_volatile(16);
            // TX enable, RX enable, RX interrupt enable.
            reg(CTRL).write_volatile(0b1011);
        }
        Uart
    }
}

impl embedded_io_async::ErrorType for Uart {
    type Error = core::convert::Infallible;
}

impl embedded_io_async::Read for Uart {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        if buf.is_empty() {
            return Ok(0);
        }
        core::future::poll_fn(|_| {
            let mut n = 0;
            // SAFETY: UART0's registers; reading DATA takes the byte.
            while n < buf.len() && unsafe { reg(STATE).read_volatile() } & STATE_RXFULL != 0 {
                buf[n] = unsafe { reg(DATA).read_volatile() } as u8;
                n += 1;
            }
            if n > 0 {
                Poll::Ready(Ok(n))
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

impl embedded_io_async::Write for Uart {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        for &b in buf {
            // QEMU drains TX at once; a real UART would await here too.
            // SAFETY: UART0's registers.
            while unsafe { reg(STATE).read_volatile() } & STATE_TXFULL != 0 {}
            unsafe { reg(DATA).write_volatile(u32::from(b)) };
        }
        Ok(buf.len())
    }

    async fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// The modem's transparent-mode connection is the UART itself: QEMU made
/// the TCP connection before the firmware started. A real modem driver
/// would dial here (AT commands) and fail when it cannot.
struct Modem {
    used: bool,
}

/// How long a redial takes: QEMU's socket chardev (`reconnect=1`) dials
/// the gateway again a second after the last connection closed, and the
/// UART cannot tell when it has.
const REDIAL_MS: u64 = 2500;

impl Connect for Modem {
    type Io = Uart;
    type Error = embedded_io_async::ErrorKind;

    async fn connect(&mut self, _host: &str, _port: u16) -> Result<Uart, Self::Error> {
        if core::mem::replace(&mut self.used, true) {
            // Whatever the last connection sends is not ours; reading it
            // lets QEMU read on to the close (it reads its socket only when
            // the UART can take a byte) and redial.
            let deadline = Ticks.now_ms() + REDIAL_MS;
            while Ticks.now_ms() < deadline {
                // SAFETY: UART0's registers; reading DATA takes the byte.
                while unsafe { reg(STATE).read_volatile() } & STATE_RXFULL != 0 {
                    let _ = unsafe { reg(DATA).read_volatile() };
                }
                Ticks.wait_until(Ticks.now_ms() + 1).await;
            }
        }
        Ok(Uart)
    }
}

// ---- the chain slots ---------------------------------------------------

const SLOTS: usize = 0x0030_8000;
const SLOT_LEN: usize = 0x1000;

/// The two chain slots after the bundle in its partition.
struct FlashSlots;

impl ChainSlots for FlashSlots {
    fn slot(&self, i: usize) -> &[u8] {
        if i > 1 {
            return &[];
        }
        // SAFETY: inside the BUNDLE region of memory.x, which nothing
        // else maps; written only through `&mut self` below.
        unsafe { core::slice::from_raw_parts((SLOTS + i * SLOT_LEN) as *const u8, SLOT_LEN) }
    }

    fn erase(&mut self, i: usize) -> Result<(), SlotError> {
        if i > 1 {
            return Err(SlotError);
        }
        for at in 0..SLOT_LEN {
            // SAFETY: as in `slot`.
            unsafe { ((SLOTS + i * SLOT_LEN + at) as *mut u8).write_volatile(0xff) };
        }
        Ok(())
    }

    fn program(&mut self, i: usize, offset: usize, bytes: &[u8]) -> Result<(), SlotError> {
        if i > 1 || offset + bytes.len() > SLOT_LEN {
            return Err(SlotError);
        }
        for (k, &b) in bytes.iter().enumerate() {
            let p = (SLOTS + i * SLOT_LEN + offset + k) as *mut u8;
            // SAFETY: as in `slot`. NOR programming clears bits only.
            unsafe { p.write_volatile(p.read_volatile() & b) };
        }
        Ok(())
    }
}

/// UART0 receive interrupt: only wakes the core from WFI; the byte stays
/// in the UART until the read future takes it.
extern "C" fn uart0_rx() {
    // SAFETY: UART0's interrupt clear register; bit 1 is RX.
    unsafe { reg(INTCLEAR).write_volatile(0b10) };
}

#[unsafe(link_section = ".vector_table.interrupts")]
#[unsafe(no_mangle)]
static __INTERRUPTS: [extern "C" fn(); 1] = [uart0_rx];

// ---- executor, exit, faults --------------------------------------------

/// Polls `f` after every interrupt and sleeps (WFI) in between. The
/// futures here need no waker: each one is re-polled on every SysTick and
/// every received byte. (embassy's Cortex-M executor idles with WFE,
/// which QEMU does not sleep on, so it would spin a host core.)
fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        cortex_m::asm::wfi();
    }
}

/// Ends the emulation with `code` as QEMU's exit status (semihosting
/// SYS_EXIT_EXTENDED; plain SYS_EXIT only distinguishes 0 and 1).
fn exit(code: u8) -> ! {
    report_stack();
    let block = [0x20026usize, usize::from(code)];
    // SAFETY: a two-word parameter block, as SYS_EXIT_EXTENDED expects.
    unsafe { cortex_m_semihosting::syscall(0x20, &block) };
    loop {
        cortex_m::asm::wfi();
    }
}

static PANICKED: AtomicBool = AtomicBool::new(false);

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    // The location only, not the message: formatting messages would keep
    // every panic site's arguments and their Debug code in flash.
    if !PANICKED.swap(true, Ordering::Relaxed) {
        match info.location() {
            Some(at) => hprintln!("twofold: panic at {}:{}", at.file(), at.line()),
            None => hprintln!("twofold: panic"),
        }
    }
    exit(101)
}

#[exception]
unsafe fn HardFault(frame: &ExceptionFrame) -> ! {
    hprintln!("twofold: hard fault at pc {:#010x}", frame.pc());
    exit(99)
}

// ---- stack measurement --------------------------------------------------

const PAINT: u32 = 0x5afe_c0de;
/// How far below the stack top painting goes; more than the agent needs.
const PAINTED: usize = 64 * 1024;

unsafe extern "C" {
    static _stack_start: u32;
    static __sheap: u32;
    static _bundle_start: u8;
    static _bundle_len: u8;
}

fn stack_top() -> usize {
    &raw const _stack_start as usize
}

/// Fills the unused stack below the current frame with [`PAINT`].
fn paint_stack() {
    let sp = cortex_m::register::msp::read() as usize;
    let mut p = stack_top() - PAINTED;
    while p < sp - 256 {
        // SAFETY: below the live stack, above .bss (4 MiB of RAM).
        unsafe { (p as *mut u32).write_volatile(PAINT) };
        p += 4;
    }
}

/// Prints static RAM and the deepest the stack went.
fn report_stack() {
    let mut p = stack_top() - PAINTED;
    // SAFETY: reads the painted region only.
    while p < stack_top() && unsafe { (p as *const u32).read_volatile() } == PAINT {
        p += 4;
    }
    let statics = &raw const __sheap as usize - 0x2000_0000;
    hprintln!(
        "twofold: ram static {} B, stack peak {} B",
        statics,
        stack_top() - p
    );
}

// ---- random numbers (emulation only) ----------------------------------

/// AES-128-CTR keyed with the host's seed: the cipher is already in flash
/// for TLS, where ChaCha20 from `rand_chacha` cost 2.6 KB more. This board
/// has no entropy source at all; the seed is the only randomness.
struct AesCtr {
    cipher: aes::Aes128,
    counter: u128,
}

impl AesCtr {
    fn new(seed: &[u8; 16]) -> Self {
        AesCtr {
            cipher: aes::Aes128::new(seed.into()),
            counter: 0,
        }
    }
}

impl BlockRngCore for AesCtr {
    type Item = u32;
    type Results = [u32; 16];

    fn generate(&mut self, results: &mut [u32; 16]) {
        let mut blocks = [aes::Block::default(); 4];
        for block in blocks.iter_mut() {
            *block = self.counter.to_le_bytes().into();
            self.counter += 1;
        }
        self.cipher.encrypt_blocks(&mut blocks);
        for (word, bytes) in results
            .iter_mut()
            .zip(blocks.iter().flat_map(|b| b.chunks(4)))
        {
            *word = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        }
    }
}

impl rand_core::CryptoRng for AesCtr {}

// ---- the command line ---------------------------------------------------

struct Args {
    seed: Option<[u8; 16]>,
    limits: Limits,
    interval_ms: u64,
    clock: bool,
}

fn parse_args(line: &str) -> Option<Args> {
    let mut a = Args {
        seed: None,
        limits: Limits::default(),
        interval_ms: 1000,
        clock: true,
    };
    // QEMU puts the kernel's path first.
    for word in line.split(|c: char| c.is_ascii_whitespace() || c == '\0') {
        let Some((k, v)) = word.split_once('=') else {
            continue;
        };
        match k {
            "seed" => a.seed = Some(hex16(v)?),
            "telemetry" => a.limits.telemetry = Some(v.parse().ok()?),
            "commands" => a.limits.commands = v.parse().ok()?,
            "renewals" => a.limits.renewals = v.parse().ok()?,
            "attempts" => a.limits.failures = Some(v.parse().ok()?),
            "interval" => a.interval_ms = v.parse().ok()?,
            "clock" => a.clock = v != "0",
            _ => return None,
        }
    }
    Some(a)
}

/// 32 hex digits as 16 bytes.
fn hex16(text: &str) -> Option<[u8; 16]> {
    let text = text.as_bytes();
    if text.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (byte, pair) in out.iter_mut().zip(text.chunks(2)) {
        let digit = |c: u8| (c as char).to_digit(16);
        *byte = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(out)
}

fn cmdline(buf: &mut [u8]) -> Option<&str> {
    let mut block = [buf.as_mut_ptr() as usize, buf.len()];
    // SAFETY: SYS_GET_CMDLINE writes at most block[1] bytes to block[0]
    // and stores the length it wrote in block[1].
    let r = unsafe {
        cortex_m_semihosting::syscall1(
            cortex_m_semihosting::nr::GET_CMDLINE,
            block.as_mut_ptr() as usize,
        )
    };
    if r != 0 {
        return None;
    }
    core::str::from_utf8(buf.get(..block[1])?).ok()
}

// ---- main -----------------------------------------------------------------

#[entry]
fn main() -> ! {
    paint_stack();
    let mut buf = [0u8; 512];
    let line = cmdline(&mut buf).unwrap_or("");
    let Some(args) = parse_args(line) else {
        hprintln!(
            "twofold: bad command line \"{}\" (seed=HEX32 telemetry=N commands=M renewals=R attempts=K interval=MS clock=0|1)",
            line
        );
        exit(21)
    };
    let Some(seed) = args.seed else {
        hprintln!("twofold: no seed= on the command line; this board has no RNG");
        exit(21)
    };

    // SAFETY: the bundle partition from memory.x up to the chain slots,
    // written before reset and never written by the firmware.
    let partition = unsafe {
        let len = (&raw const _bundle_len as usize).min(SLOTS - 0x0030_0000);
        core::slice::from_raw_parts(&raw const _bundle_start, len)
    };
    let bundle = match Bundle::decode(partition) {
        Ok(b) => b,
        Err(e) => {
            hprintln!("twofold: no usable bundle in flash: {}", e);
            exit(20)
        }
    };
    let Ok(key) = p256::ecdsa::SigningKey::from_slice(bundle.private_key) else {
        hprintln!("twofold: the bundle's private key is not a P-256 scalar");
        exit(20)
    };
    // With a secure element the key goes into it (the factory's step,
    // here at boot) and the agent gets only a handle that signs through
    // the element's command frames.
    #[cfg(feature = "secure-element")]
    let mut element = element::SimulatedElement::new();
    #[cfg(feature = "secure-element")]
    let mut key = {
        if !element::personalize(&mut element, 0, bundle.private_key) {
            hprintln!("twofold: the secure element refused the key");
            exit(20)
        }
        let expected = key.verifying_key().to_encoded_point(false);
        drop(key);
        let mut handle = element::ElementKey::new(&mut element, 0);
        if handle.public().as_ref().map(|p| &p[..]) != Some(expected.as_bytes()) {
            hprintln!("twofold: the secure element's key is not the certificate's");
            exit(20)
        }
        hprintln!("twofold: device key in secure element slot 0");
        handle
    };
    #[cfg(not(feature = "secure-element"))]
    let mut key = key;
    hprintln!("twofold: device {}", bundle.device_id.as_str());

    let mut cp = cortex_m::Peripherals::take().unwrap_or_else(|| exit(101));
    cp.SYST.set_clock_source(SystClkSource::Core);
    cp.SYST.set_reload(CORE_HZ / 1000 - 1);
    cp.SYST.clear_current();
    cp.SYST.enable_counter();
    cp.SYST.enable_interrupt();
    let _uart = Uart::init();
    // SAFETY: IRQ 0 is UART0 RX, whose handler is in __INTERRUPTS.
    unsafe { cortex_m::peripheral::NVIC::unmask(Irq::Uart0Rx) };

    let mut rng = BlockRng::new(AesCtr::new(&seed));
    let settings = Settings {
        telemetry_ms: args.interval_ms,
        backoff_min_ms: 100,
        backoff_max_ms: 1000,
        ..Settings::default()
    };
    let log = |e: &dyn core::fmt::Display| hprintln!("twofold: {}", e);
    let app = BasicApp::new(Ticks, args.limits, log).with_time(unix_ms);
    let mut agent = Agent::new(&bundle, settings, app, Ticks).with_slots(FlashSlots);
    // Statics, handed out once.
    let (Some(tls_rx), Some(tls_tx), Some(mqtt_rx), Some(mqtt_tx)) = (
        cortex_m::singleton!(: [u8; TLS_RX] = [0; TLS_RX]),
        cortex_m::singleton!(: [u8; TLS_TX] = [0; TLS_TX]),
        cortex_m::singleton!(: [u8; MQTT_RX] = [0; MQTT_RX]),
        cortex_m::singleton!(: [u8; MQTT_TX] = [0; MQTT_TX]),
    ) else {
        exit(101)
    };
    let mut bufs = Buffers {
        tls_rx,
        tls_tx,
        mqtt_rx,
        mqtt_tx,
    };
    let mut modem = Modem { used: false };
    let mut rtc = Rtc {
        enabled: args.clock,
    };
    let session = agent.run(&mut modem, &mut rng, &mut key, &mut rtc, &mut bufs);
    hprintln!(
        "twofold: agent future {} B",
        core::mem::size_of_val(&session)
    );
    let result = block_on(session);
    match result {
        Ok(stats) => {
            hprintln!(
                "twofold: stopped: {} telemetry acknowledged, {} commands, {} renewals",
                stats.telemetry_acked,
                stats.commands,
                stats.renewals
            );
            exit(0)
        }
        Err(e) => {
            hprintln!("twofold: giving up: {}", e);
            exit(e.exit_code())
        }
    }
}

#[derive(Clone, Copy)]
enum Irq {
    Uart0Rx = 0,
}

// SAFETY: the number is a valid mps2-an386 interrupt.
unsafe impl cortex_m::interrupt::InterruptNumber for Irq {
    fn number(self) -> u16 {
        self as u16
    }
}
