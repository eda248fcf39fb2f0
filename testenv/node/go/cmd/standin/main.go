// standin is every process of the node tests' images, as one static binary (CGO off):
//
//	standin pause            the sandbox's pause process: waits for SIGTERM/SIGINT, reaps children
//	standin sidecar PORT...  kuma-sidecar stand-in: on each connection writes one line
//	                         "sidecar port=P uid=U orig=IP:PORT" (orig from SO_ORIGINAL_DST) and closes
//	standin serve PORT       a plain server: writes "serve port=P" and closes
//	standin dial ADDR...     the app: dials each ADDR every second and logs
//	                         "dial ADDR -> <first line of the answer>" (or the error), forever
package main

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"
	"unsafe"
)

func main() {
	if len(os.Args) < 2 {
		fail("usage: standin pause|sidecar PORT...|serve PORT|dial ADDR...")
	}
	args := os.Args[2:]
	switch os.Args[1] {
	case "pause":
		pause()
	case "sidecar":
		for _, p := range args {
			go listen(p, func(c net.Conn, port string) string {
				return fmt.Sprintf("sidecar port=%s uid=%d orig=%s", port, os.Getuid(), originalDst(c))
			})
		}
		select {}
	case "serve":
		listen(args[0], func(_ net.Conn, port string) string { return "serve port=" + port })
	case "dial":
		for {
			for _, a := range args {
				fmt.Printf("dial %s -> %s\n", a, dial(a))
			}
			time.Sleep(time.Second)
		}
	default:
		fail("unknown command " + os.Args[1])
	}
}

func pause() {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for s := range sigs {
		if s != syscall.SIGCHLD {
			return
		}
		for {
			if pid, _ := syscall.Wait4(-1, nil, syscall.WNOHANG, nil); pid <= 0 {
				break
			}
		}
	}
}

func listen(port string, answer func(net.Conn, string) string) {
	l, err := net.Listen("tcp4", ":"+port)
	if err != nil {
		fail(err.Error())
	}
	fmt.Printf("listening on %s as uid %d\n", l.Addr(), os.Getuid())
	for {
		c, err := l.Accept()
		if err != nil {
			fail(err.Error())
		}
		go func() {
			defer c.Close()
			fmt.Fprintln(c, answer(c, port))
		}()
	}
}

func dial(addr string) string {
	c, err := net.DialTimeout("tcp4", addr, 2*time.Second)
	if err != nil {
		return "error: " + err.Error()
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "error: " + err.Error()
	}
	return line[:len(line)-1]
}

// originalDst reads SO_ORIGINAL_DST (IPv4): where the client meant to go before the
// REDIRECT brought it here; "none" when the connection was not redirected.
func originalDst(c net.Conn) string {
	raw, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		return "error: " + err.Error()
	}
	var sa syscall.RawSockaddrInet4
	var serr error
	_ = raw.Control(func(fd uintptr) {
		size := uint32(unsafe.Sizeof(sa))
		const soOriginalDst = 80
		_, _, errno := syscall.Syscall6(syscall.SYS_GETSOCKOPT, fd, syscall.SOL_IP, soOriginalDst,
			uintptr(unsafe.Pointer(&sa)), uintptr(unsafe.Pointer(&size)), 0)
		if errno != 0 {
			serr = errno
		}
	})
	if serr != nil {
		return "none"
	}
	port := int(sa.Port>>8) | int(sa.Port&0xff)<<8
	return fmt.Sprintf("%d.%d.%d.%d:%d", sa.Addr[0], sa.Addr[1], sa.Addr[2], sa.Addr[3], port)
}

func fail(msg string) {
	fmt.Fprintln(os.Stderr, "standin:", msg)
	os.Exit(1)
}
