// A Go peer built on containerd/ttrpc, for checking that spinbox.ttrpc
// interoperates with it in both directions: `gopeer serve SOCKET` serves the
// test service (Echo, Count, Sum), `gopeer client SOCKET` calls spinbox's test
// service and prints one line per result.
package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"

	"github.com/containerd/ttrpc"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

const svc = "spinbox.test.Echo"

func serve(path string) {
	s, err := ttrpc.NewServer()
	if err != nil {
		panic(err)
	}
	s.RegisterService(svc, &ttrpc.ServiceDesc{
		Methods: map[string]ttrpc.Method{
			"Echo": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
				var req wrapperspb.StringValue
				if err := unmarshal(&req); err != nil {
					return nil, err
				}
				return &wrapperspb.StringValue{Value: "go:" + req.Value}, nil
			},
		},
		Streams: map[string]ttrpc.Stream{
			"Count": {StreamingServer: true, Handler: func(ctx context.Context, ss ttrpc.StreamServer) (interface{}, error) {
				var req wrapperspb.Int64Value
				if err := ss.RecvMsg(&req); err != nil {
					return nil, err
				}
				for i := int64(0); i < req.Value; i++ {
					if err := ss.SendMsg(&wrapperspb.Int64Value{Value: i}); err != nil {
						return nil, err
					}
				}
				return nil, nil
			}},
			"Sum": {StreamingClient: true, Handler: func(ctx context.Context, ss ttrpc.StreamServer) (interface{}, error) {
				var total int64
				for {
					var req wrapperspb.Int64Value
					if err := ss.RecvMsg(&req); err != nil {
						if err == io.EOF {
							break
						}
						return nil, err
					}
					total += req.Value
				}
				return &wrapperspb.Int64Value{Value: total}, nil
			}},
		},
	})
	os.Remove(path)
	l, err := net.Listen("unix", path)
	if err != nil {
		panic(err)
	}
	fmt.Println("ready")
	s.Serve(context.Background(), l)
}

func client(path string) {
	conn, err := net.Dial("unix", path)
	if err != nil {
		panic(err)
	}
	c := ttrpc.NewClient(conn)
	defer c.Close()
	ctx := context.Background()
	var resp wrapperspb.StringValue
	if err := c.Call(ctx, svc, "Echo", &wrapperspb.StringValue{Value: "from-go"}, &resp); err != nil {
		panic(err)
	}
	fmt.Println("echo", resp.Value)
	err = c.Call(ctx, svc, "Fail", &wrapperspb.StringValue{Value: "c9"}, &resp)
	fmt.Println("fail", err)

	st, err := c.NewStream(ctx, &ttrpc.StreamDesc{StreamingServer: true}, svc, "Count", &wrapperspb.Int64Value{Value: 4})
	if err != nil {
		panic(err)
	}
	got := []int64{}
	for {
		var m wrapperspb.Int64Value
		if err := st.RecvMsg(&m); err != nil {
			if err == io.EOF {
				break
			}
			panic(err)
		}
		got = append(got, m.Value)
	}
	fmt.Println("count", got)

	st, err = c.NewStream(ctx, &ttrpc.StreamDesc{StreamingClient: true}, svc, "Sum", nil)
	if err != nil {
		panic(err)
	}
	for i := int64(1); i <= 10; i++ {
		if err := st.SendMsg(&wrapperspb.Int64Value{Value: i}); err != nil {
			panic(err)
		}
	}
	if err := st.CloseSend(); err != nil {
		panic(err)
	}
	var total wrapperspb.Int64Value
	if err := st.RecvMsg(&total); err != nil {
		panic(err)
	}
	fmt.Println("sum", total.Value)

	st, err = c.NewStream(ctx, &ttrpc.StreamDesc{StreamingServer: true}, svc, "CountThenFail", &wrapperspb.Int64Value{Value: 2})
	if err != nil {
		panic(err)
	}
	for {
		var m wrapperspb.Int64Value
		if err := st.RecvMsg(&m); err != nil {
			fmt.Println("countfail end", err)
			break
		}
		fmt.Println("countfail", m.Value)
	}
}

func main() {
	if os.Args[1] == "serve" {
		serve(os.Args[2])
	} else {
		client(os.Args[2])
	}
}
