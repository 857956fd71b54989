//! The microcontroller agent on an STM32 Nucleo-F767ZI (Cortex-M7F,
//! `thumbv7em-none-eabihf`).
//!
//! This crate only wires the board to `twofold-agent-nostd`:
//!
//! - **link**: the on-board Ethernet (RMII, LAN8742A PHY) through
//!   embassy-stm32's driver and embassy-net (smoltcp): DHCP for the
//!   address, DNS for the gateway's host name, one TCP socket at a time;
//! - **time**: embassy-time (a hardware timer); no wall clock, so the
//!   verifier checks no certificate dates (see `agent-nostd`'s `verify`
//!   module for what that means);
//! - **random numbers**: the STM32 RNG peripheral, for TLS and for
//!   smoltcp's initial sequence numbers;
//! - **bundle**: read in place from the last flash sector (0x081C_0000),
//!   written there at enrolment (see README.md);
//! - **log**: USART3, which the Nucleo's ST-LINK presents as a serial port
//!   on the host (115200 8N1).
#![no_std]
#![no_main]

use core::cell::RefCell;
use core::fmt::Write as _;
use core::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use critical_section::Mutex;
use embassy_executor::Spawner;
use embassy_net::dns::DnsQueryType;
use embassy_net::tcp::client::{TcpClient, TcpClientState, TcpConnection};
use embassy_net::{IpAddress, Stack, StackResources};
use embassy_stm32::eth::{Ethernet, GenericPhy, PacketQueue, Sma};
use embassy_stm32::mode::Blocking;
use embassy_stm32::peripherals::{ETH, ETH_SMA, RNG};
use embassy_stm32::rng::Rng;
use embassy_stm32::time::Hertz;
use embassy_stm32::usart::UartTx;
use embassy_stm32::{Config, bind_interrupts, eth, rng};
use embassy_time::Instant;
use embedded_io::ErrorKind;
use embedded_nal_async::TcpConnect;
use static_cell::StaticCell;
use twofold_agent_nostd::basic::{BasicApp, Limits};
use twofold_agent_nostd::{Agent, Buffers, Connect, NoClock, Settings, Timer};
use twofold_agent_nostd::{
    MCU_MQTT_RX as MQTT_RX, MCU_MQTT_TX as MQTT_TX, MCU_TLS_RX as TLS_RX, MCU_TLS_TX as TLS_TX,
};
use twofold_protocol::Bundle;

bind_interrupts!(struct Irqs {
    ETH => eth::InterruptHandler;
    RNG => rng::InterruptHandler<RNG>;
});

type Device = Ethernet<'static, ETH, GenericPhy<Sma<'static, ETH_SMA>>>;

/// TCP socket buffers (smoltcp's windows).
const TCP_RX: usize = 2048;
const TCP_TX: usize = 1024;

unsafe extern "C" {
    static _bundle_start: u8;
    static _bundle_len: u8;
}

// ---- log ----------------------------------------------------------------

static LOG: Mutex<RefCell<Option<UartTx<'static, Blocking>>>> = Mutex::new(RefCell::new(None));

struct LogLine<'a>(&'a mut UartTx<'static, Blocking>);

impl core::fmt::Write for LogLine<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.0
            .blocking_write(s.as_bytes())
            .map_err(|_| core::fmt::Error)
    }
}

fn log(line: core::fmt::Arguments<'_>) {
    critical_section::with(|cs| {
        if let Some(uart) = LOG.borrow_ref_mut(cs).as_mut() {
            let _ = writeln!(LogLine(uart), "twofold: {line}\r");
        }
    });
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    // The location only, not the message (see the QEMU board).
    if let Some(at) = info.location() {
        log(format_args!("panic at {}:{}", at.file(), at.line()));
    }
    cortex_m::peripheral::SCB::sys_reset()
}

// ---- time ---------------------------------------------------------------

#[derive(Clone, Copy)]
struct Ticks;

impl Timer for Ticks {
    fn now_ms(&self) -> u64 {
        Instant::now().as_millis()
    }

    async fn wait_until(&self, deadline: u64) {
        embassy_time::Timer::at(Instant::from_millis(deadline)).await
    }
}

// ---- network ------------------------------------------------------------

#[embassy_executor::task]
async fn net_task(mut runner: embassy_net::Runner<'static, Device>) -> ! {
    runner.run().await
}

/// Dials the gateway over embassy-net: DNS (or an address literal), then
/// TCP, one connection at a time from a static socket pool.
struct Net {
    stack: Stack<'static>,
    client: &'static TcpClient<'static, 1, TCP_TX, TCP_RX>,
}

/// Why dialling failed, in `embedded_io` terms for the agent's log.
#[derive(Debug, Clone, Copy)]
struct DialError(ErrorKind);

impl core::fmt::Display for DialError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self.0 {
            ErrorKind::AddrNotAvailable => "cannot resolve the gateway's host name",
            _ => "cannot connect to the gateway",
        })
    }
}

impl core::error::Error for DialError {}

impl embedded_io::Error for DialError {
    fn kind(&self) -> ErrorKind {
        self.0
    }
}

impl Connect for Net {
    type Io = TcpConnection<'static, 1, TCP_TX, TCP_RX>;
    type Error = DialError;

    async fn connect(&mut self, host: &str, port: u16) -> Result<Self::Io, DialError> {
        self.stack.wait_config_up().await;
        let addresses = self
            .stack
            .dns_query(host, DnsQueryType::A)
            .await
            .map_err(|_| DialError(ErrorKind::AddrNotAvailable))?;
        let Some(IpAddress::Ipv4(ip)) = addresses.first().copied() else {
            return Err(DialError(ErrorKind::AddrNotAvailable));
        };
        let to = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip.octets()), port));
        self.client
            .connect(to)
            .await
            .map_err(|_| DialError(ErrorKind::ConnectionRefused))
    }
}

// ---- main ---------------------------------------------------------------

#[embassy_executor::main]
async fn main(spawner: Spawner) {
    let p = embassy_stm32::init(clocks());
    let uart = UartTx::new_blocking(p.USART3, p.PD8, Default::default());
    if let Ok(uart) = uart {
        critical_section::with(|cs| LOG.replace(cs, Some(uart)));
    }

    // SAFETY: the bundle partition from memory.x, written at enrolment
    // and never written by the firmware.
    let partition = unsafe {
        core::slice::from_raw_parts(&raw const _bundle_start, &raw const _bundle_len as usize)
    };
    let bundle = match Bundle::decode(partition) {
        Ok(b) => b,
        Err(e) => return log(format_args!("no usable bundle in flash: {e}")),
    };
    let Ok(mut key) = p256::ecdsa::SigningKey::from_slice(bundle.private_key) else {
        return log(format_args!(
            "the bundle's private key is not a P-256 scalar"
        ));
    };
    log(format_args!("device {}", bundle.device_id.as_str()));

    let mut rng = Rng::new(p.RNG, Irqs);
    // A locally administered MAC address, stable per device (from the
    // STM32's unique id).
    let uid = embassy_stm32::uid::uid();
    let mac = [0x02, uid[0], uid[1], uid[2], uid[3], uid[4]];

    static PACKETS: StaticCell<PacketQueue<4, 4>> = StaticCell::new();
    let device = Ethernet::new(
        PACKETS.init(PacketQueue::new()),
        p.ETH,
        Irqs,
        p.PA1,  // REF_CLK
        p.PA7,  // CRS_DV
        p.PC4,  // RXD0
        p.PC5,  // RXD1
        p.PG13, // TXD0
        p.PB13, // TXD1
        p.PG11, // TX_EN
        mac,
        p.ETH_SMA,
        p.PA2, // MDIO
        p.PC1, // MDC
    );
    static RESOURCES: StaticCell<StackResources<3>> = StaticCell::new();
    let config = embassy_net::Config::dhcpv4(Default::default());
    let (stack, runner) = embassy_net::new(
        device,
        config,
        RESOURCES.init(StackResources::new()),
        rng.next_u64(),
    );
    spawner.spawn(net_task(runner).unwrap());

    static TCP: StaticCell<TcpClientState<1, TCP_TX, TCP_RX>> = StaticCell::new();
    static CLIENT: StaticCell<TcpClient<'static, 1, TCP_TX, TCP_RX>> = StaticCell::new();
    let client = CLIENT.init(TcpClient::new(stack, TCP.init(TcpClientState::new())));
    let mut net = Net { stack, client };

    static TLS_RX_BUF: StaticCell<[u8; TLS_RX]> = StaticCell::new();
    static TLS_TX_BUF: StaticCell<[u8; TLS_TX]> = StaticCell::new();
    static MQTT_RX_BUF: StaticCell<[u8; MQTT_RX]> = StaticCell::new();
    static MQTT_TX_BUF: StaticCell<[u8; MQTT_TX]> = StaticCell::new();
    let mut bufs = Buffers {
        tls_rx: TLS_RX_BUF.init([0; TLS_RX]),
        tls_tx: TLS_TX_BUF.init([0; TLS_TX]),
        mqtt_rx: MQTT_RX_BUF.init([0; MQTT_RX]),
        mqtt_tx: MQTT_TX_BUF.init([0; MQTT_TX]),
    };

    let app = BasicApp::new(Ticks, Limits::default(), |e: &dyn core::fmt::Display| {
        log(format_args!("{e}"))
    });
    let mut agent = Agent::new(&bundle, Settings::default(), app, Ticks);
    // Runs until the app stops, which BasicApp without limits never does;
    // every failure is retried after the backoff.
    match agent
        .run(&mut net, &mut rng, &mut key, &mut NoClock, &mut bufs)
        .await
    {
        Ok(_) => log(format_args!("stopped")),
        Err(e) => log(format_args!("giving up: {e}")),
    }
    loop {
        embassy_time::Timer::after_secs(3600).await;
    }
}

/// 216 MHz from the ST-LINK's 8 MHz clock (HSE bypass), and 48 MHz on
/// PLL Q for the RNG.
fn clocks() -> Config {
    use embassy_stm32::rcc::{
        AHBPrescaler, APBPrescaler, Hse, HseMode, Pll, PllMul, PllPDiv, PllPreDiv, PllQDiv,
        PllSource, Sysclk,
    };
    let mut config = Config::default();
    config.rcc.hse = Some(Hse {
        freq: Hertz(8_000_000),
        mode: HseMode::Bypass,
    });
    config.rcc.pll_src = PllSource::HSE;
    config.rcc.pll = Some(Pll {
        prediv: PllPreDiv::DIV4,
        mul: PllMul::MUL216,
        divp: Some(PllPDiv::DIV2),
        divq: Some(PllQDiv::DIV9),
        divr: None,
    });
    config.rcc.ahb_pre = AHBPrescaler::DIV1;
    config.rcc.apb1_pre = APBPrescaler::DIV4;
    config.rcc.apb2_pre = APBPrescaler::DIV2;
    config.rcc.sys = Sysclk::PLL1_P;
    config
}
